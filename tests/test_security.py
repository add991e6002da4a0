"""Encryption at rest, tampering, key rotation, and secrets that never leave the broker."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from broker.api import METRICS, STORE
from broker.devprovider import DevProvider, FailureKind
from broker.store import GrantStore
from tests.conftest import SECRETS, Broker, BrokerFactory, RedisServer, path


def store_of(broker: Broker) -> GrantStore:
    return broker.app[STORE]


async def test_records_in_redis_hold_no_plaintext_token(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    refresh_token = provider.issue_refresh_token("u")
    await broker.import_grant("u", refresh_token=refresh_token)
    store = store_of(broker)
    raw = await store.redis.hgetall(store.keys.grant_key("dev", "u"))
    everything = b"".join(x for x in [*raw.keys(), *raw.values()] if isinstance(x, bytes))
    assert b"blob" in everything
    grant = await store.read("dev", "u")
    assert grant is not None
    assert grant.access_token is not None
    assert grant.refresh_token is not None
    assert grant.refresh_token.encode() not in everything
    assert grant.access_token.encode() not in everything
    assert refresh_token.encode() not in everything


async def test_a_record_copied_to_another_user_is_refused(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant(
        "alice", refresh_token="rt-alice", access_token="at-alice", expires_in=600
    )
    await broker.import_grant("mallory", refresh_token="rt-m", access_token="at-m", expires_in=600)
    store = store_of(broker)
    blob = await store.redis.hget(store.keys.grant_key("dev", "alice"), "blob")
    await store.redis.hset(store.keys.grant_key("dev", "mallory"), "blob", blob)
    async with broker.client.get(path("tokens", "mallory"), headers=broker.headers) as response:
        text = await response.text()
        assert response.status == 500
    assert json.loads(text)["code"] == "grant_unreadable"
    assert "at-alice" not in text
    app = broker.app
    assert (
        app[METRICS].registry.get_sample_value(
            "broker_grants_unreadable_total", {"provider": "dev"}
        )
        == 1.0
    )


async def test_an_unreadable_grant_can_be_deleted_or_replaced(broker: Broker) -> None:
    await broker.import_grant("u", refresh_token="rt", access_token="at", expires_in=600)
    store = store_of(broker)
    await store.redis.hset(store.keys.grant_key("dev", "u"), "blob", b"\x01\x02k1" + os.urandom(40))
    assert (await broker.grant("u"))[0] == 500
    status, _ = await broker.import_grant(
        "u", refresh_token="rt2", access_token="at2", expires_in=600
    )
    assert status == 200
    assert (await broker.token("u"))[1]["access_token"] == "at2"
    await store.redis.hset(store.keys.grant_key("dev", "u"), "blob", b"garbage")
    status, _, headers = await broker.call("DELETE", path("grants", "u"))
    assert status == 204
    assert headers["Broker-Revocation"] == "skipped"


async def test_key_rotation_keeps_old_records_readable(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    old = "k1:" + base64.b64encode(os.urandom(32)).decode()
    new = "k2:" + base64.b64encode(os.urandom(32)).decode()
    SECRETS.update({old[3:], new[3:]})
    common = {"redis_url": redis_server.url, "key_prefix": key_prefix}
    before = await make_broker(encryption_keys=old, **common)
    await before.import_grant("u", refresh_token="rt", access_token="at-k1", expires_in=600)
    rotated = await make_broker(encryption_keys=f"{new},{old}", **common)
    assert (await rotated.token("u"))[1]["access_token"] == "at-k1"
    await rotated.import_grant("v", refresh_token="rt", access_token="at-k2", expires_in=600)
    store = store_of(rotated)
    blob = await store.redis.hget(store.keys.grant_key("dev", "v"), "blob")
    assert isinstance(blob, bytes)
    assert store.codec.keyring.key_id_of(blob) == "k2"
    too_early = await make_broker(encryption_keys=new, **common)
    status, body = await too_early.token("u")
    assert status == 500
    assert body["code"] == "grant_unreadable"
    assert old[3:] not in json.dumps(body)


async def test_no_secret_in_any_response_body(broker: Broker, provider: DevProvider) -> None:
    refresh_token = provider.issue_refresh_token("u")
    bodies = []
    _status, body = await broker.import_grant("u", refresh_token=refresh_token)
    bodies.append(body)
    broker.clock.advance(3600)
    failures: list[FailureKind] = ["server_error", "garbage", "rate_limited", "invalid_client"]
    for failure in failures:
        provider.fail_next(failure)
        bodies.append((await broker.token("u"))[1])
    bodies.append((await broker.grant("u"))[1])
    provider.fail_next("invalid_grant")
    bodies.append((await broker.token("u"))[1])
    bodies.append((await broker.grant("u"))[1])
    text = json.dumps(bodies)
    assert "reauth_required" in text
    for secret in provider.secrets() | {broker.api_key}:
        assert secret not in text


async def test_logs_of_a_whole_flow_hold_no_secret(
    broker: Broker, provider: DevProvider, log_file: Path
) -> None:
    """The session-wide check covers every test; this one proves it sees real traffic."""
    before = log_file.stat().st_size
    refresh_token = provider.issue_refresh_token("u")
    await broker.import_grant("u", refresh_token=refresh_token)
    broker.clock.advance(3600)
    provider.fail_next("garbage")
    await broker.token("u")
    status, token = await broker.token("u")
    assert status == 200
    await broker.call("DELETE", path("grants", "u"))
    with log_file.open(encoding="utf-8") as stream:
        stream.seek(before)
        lines = stream.read()
    assert '"event": "token.handout"' in lines
    assert '"event": "refresh.failed"' in lines
    assert '"event": "grant.deleted"' in lines
    for secret in provider.secrets() | {broker.api_key, refresh_token, token["access_token"]}:
        assert secret not in lines


async def test_logged_exceptions_do_not_show_local_variables(log_file: Path) -> None:
    import structlog

    log = structlog.get_logger("test")
    secret = "rt_" + os.urandom(12).hex()
    SECRETS.add(secret)

    def fails(refresh_token: str) -> None:
        raise RuntimeError("boom")

    try:
        fails(secret)
    except RuntimeError:
        log.exception("test.exception")
    text = log_file.read_text(encoding="utf-8")
    assert '"test.exception"' in text
    assert secret not in text
