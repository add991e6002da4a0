"""Secrets stay out of what broker shows besides its logs: error bodies, /metrics, grant
statuses (the session-wide check in tests/conftest.py reads every such answer of the run) and
the reprs of the objects that hold them."""

from __future__ import annotations

from pathlib import Path

from broker.api import KEYRING, SETTINGS, STORE
from broker.devprovider import DevProvider
from broker.errors import GrantUnreadable
from tests.conftest import SECRETS, Broker, BrokerFactory, RedisServer, path
from tests.exposure import EXPOSURE, leaked


async def test_the_session_check_sees_problem_bodies_and_metrics(
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
    exposed_file: Path,
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    before, offset = EXPOSURE.answers, exposed_file.stat().st_size
    refresh_token = provider.issue_refresh_token("u")
    await broker.import_grant("u", refresh_token=refresh_token)
    broker.clock.advance(3600)
    provider.fail_next("invalid_client")
    assert (await broker.token("u"))[0] == 503
    status, token = await broker.token("u")
    assert status == 200
    await broker.call("GET", path("grants", "u"))
    await broker.call("GET", "/v1/grants/dev", headers={"Authorization": "Bearer wrong-key-123"})
    async with broker.client.get("/metrics") as response:
        assert response.status == 200

    with exposed_file.open(encoding="utf-8") as stream:
        stream.seek(offset)
        seen = stream.read()
    assert EXPOSURE.answers - before >= 5
    assert '"code": "upstream_unavailable"' in seen or '"code":"upstream_unavailable"' in seen
    assert "unauthenticated" in seen
    assert "broker_refreshes_total" in seen
    assert '"state": "active"' in seen or '"state":"active"' in seen
    assert token["access_token"] not in seen  # the hand-out itself is not recorded
    secrets = provider.secrets() | {broker.api_key, refresh_token}
    assert leaked(secrets, seen) == []
    assert leaked({refresh_token}, seen + refresh_token) == [refresh_token]  # the check bites


async def test_reprs_of_what_holds_secrets_show_none(broker: Broker, provider: DevProvider) -> None:
    refresh_token = provider.issue_refresh_token("u")
    await broker.import_grant("u", refresh_token=refresh_token)
    grant = await broker.app[STORE].read("dev", "u")
    assert grant is not None
    assert grant.access_token is not None
    assert grant.refresh_token is not None
    settings = broker.app[SETTINGS]
    shown = " ".join(
        [
            repr(settings),
            str(settings),
            repr(settings.providers),
            repr(settings.clients),
            repr(grant),
            str(grant),
            repr(broker.app[KEYRING]),
            repr(broker.app[KEYRING].key_ids),
            repr(GrantUnreadable("record failed authentication")),
        ]
    )
    secrets = {grant.refresh_token, grant.access_token, broker.api_key, *SECRETS}
    secrets |= {provider.settings.client_secret, *settings.clients[0].key_sha256}
    assert leaked(secrets, shown) == []
    assert "u" in repr(grant)  # the repr is there, just without the secrets
