"""Providers that issue no refresh token (Cloud 66, GitHub OAuth apps): the grant holds the
access token alone, through the whole flow against the dev provider answering as Cloud 66
documents. Such a grant is served until its stated expiry, never taken to the token endpoint
again after the code exchange (the provider counts every token request), and revoked as an
access token."""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import parse_qsl

import aiohttp
import pytest

from broker.api import SCHEDULER, STORE
from broker.devprovider import DevProvider
from broker.models import iso
from tests.conftest import FAST_SCHEDULER as FAST
from tests.conftest import (
    Broker,
    BrokerFactory,
    Landing,
    RedisServer,
    connect,
    encryption_key,
    eventually,
    free_port,
    path,
)

DAY = 86400


def like_cloud66(provider: DevProvider, *, expires_in: int | None = None) -> None:
    """Cloud 66's documented answer: ``access_token=...&token_type=bearer`` and nothing else;
    with ``expires_in``, an access token alone that states its lifetime."""
    provider.settings.form_encoded = True
    provider.settings.include_scope = False
    provider.settings.issue_refresh_tokens = False
    provider.settings.include_expires_in = expires_in is not None
    provider.settings.access_token_ttl = expires_in or 3600


@pytest.fixture
async def broker(make_broker: BrokerFactory, store_url: dict[str, str], landing: Landing) -> Broker:
    """A broker reachable at its public_url, on the embedded store and on a real Redis."""
    return await make_broker(port=free_port(), redirect_allowlist=[landing.url + "/"], **store_url)


async def connected(
    broker: Broker, browser: aiohttp.ClientSession, landing: Landing, user: str
) -> str:
    """Connect ``user`` through the whole flow; the access token the broker hands out."""
    journey = await connect(broker, browser, user, landing.url + "/")
    assert journey.query == {"status": "connected", "provider": "dev"}
    status, answer = await broker.token(user)
    assert status == 200, answer
    token: str = answer["access_token"]
    return token


async def test_the_dev_provider_answers_exactly_as_cloud66_documents(
    provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    like_cloud66(provider)
    provider.settings.require_pkce = False
    callback = landing.url + "/cb"
    query = {
        "response_type": "code",
        "client_id": provider.settings.client_id,
        "redirect_uri": callback,
        "state": "s",
    }
    async with browser.get(provider.authorize_url, params=query, allow_redirects=False) as sent:
        code = dict(parse_qsl(sent.headers["Location"].partition("?")[2]))["code"]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": callback}
    pair = f"{provider.settings.client_id}:{provider.settings.client_secret}".encode()
    auth = {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    async with browser.post(provider.token_url, data=form, headers=auth) as response:
        assert response.content_type == "application/x-www-form-urlencoded"
        answer = dict(parse_qsl(await response.text()))
    assert sorted(answer) == ["access_token", "token_type"]
    assert answer["token_type"] == "bearer"
    async with browser.post(provider.token_url, data=form, headers=auth) as response:
        assert response.status == 400  # codes stay single use
    async with browser.post(provider.token_url, data={**form, "code": "x"}) as response:
        assert response.status == 401  # client authentication checked


async def test_a_connected_access_token_alone_is_stored_and_served_without_expiry(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    like_cloud66(provider)
    token = await connected(broker, browser, landing, "cy")
    assert provider.access_token_expires_at(token) is not None  # the one the provider issued
    status, answer = await broker.token("cy", min_ttl=3600)  # always met: it does not expire
    assert status == 200
    assert answer == {
        "access_token": token,
        "token_type": "Bearer",
        "expires_at": None,
        "expires_in": None,
        "scope": "public_api",
    }
    _, grant = await broker.grant("cy")
    assert grant["state"] == "active"
    assert grant["has_refresh_token"] is False
    assert (grant["access_expires_at"], grant["next_refresh_at"]) == (None, None)
    assert grant["refresh_token_issued_at"] is None
    broker.clock.advance(400 * DAY)
    assert (await broker.token("cy"))[1]["access_token"] == token
    assert (provider.token_requests, provider.code_exchanges) == (1, 1)


async def test_the_access_token_is_stored_encrypted(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    like_cloud66(provider)
    broker = await make_broker(
        port=free_port(),
        redirect_allowlist=[landing.url + "/"],
        redis_url=redis_server.url,
        key_prefix=key_prefix,
    )
    token = await connected(broker, browser, landing, "enc")
    store = broker.app[STORE]
    raw = await store.redis.hgetall(store.keys.grant_key("dev", "enc"))
    assert raw
    assert all(token.encode() not in part for item in raw.items() for part in item)


async def test_a_stated_expiry_is_served_until_then_and_then_a_user_must_reconnect(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    like_cloud66(provider, expires_in=600)
    token = await connected(broker, browser, landing, "ex")
    status, answer = await broker.token("ex", min_ttl=3600)  # more than it can give: as is
    assert status == 200
    assert answer["access_token"] == token
    assert 595 <= answer["expires_in"] <= 600
    _, grant = await broker.grant("ex")
    assert grant["access_expires_at"] == answer["expires_at"]
    assert grant["next_refresh_at"] is None
    broker.clock.advance(590)
    assert (await broker.token("ex", min_ttl=0))[1]["access_token"] == token
    broker.clock.advance(11)
    status, problem = await broker.token("ex", min_ttl=0)
    assert (status, problem["code"]) == (409, "reauth_required")
    _, grant = await broker.grant("ex")
    assert (grant["state"], grant["last_error"]) == ("reauth_required", "access_token_expired")
    assert grant["consecutive_failures"] == 0  # nothing failed: the token ran out
    assert provider.token_requests == 1  # the code exchange, nothing after it
    # Connecting again replaces it.
    again = await connected(broker, browser, landing, "ex")
    assert again != token
    assert (await broker.grant("ex"))[1]["state"] == "active"


async def test_a_rejected_token_that_cannot_be_refreshed_means_reconnecting(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    like_cloud66(provider)
    token = await connected(broker, browser, landing, "rj")
    report = path("tokens", "rj") + "/refresh"
    status, answer, _ = await broker.call("POST", report, json={"rejected_token": "at-stale"})
    assert (status, answer["access_token"]) == (200, token)  # not the held one: as is
    status, problem, _ = await broker.call("POST", report, json={"rejected_token": token})
    assert (status, problem["code"]) == (409, "reauth_required")
    _, grant = await broker.grant("rj")
    assert (grant["state"], grant["last_error"]) == ("reauth_required", "access_token_rejected")
    assert (await broker.token("rj"))[0] == 409
    assert provider.token_requests == 1


async def test_delete_revokes_the_access_token_at_the_provider(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    like_cloud66(provider)
    token = await connected(broker, browser, landing, "del")
    status, _, headers = await broker.call("DELETE", path("grants", "del"))
    assert (status, headers["Broker-Revocation"]) == (204, "revoked")
    revocation = provider.revocations[-1]
    assert (revocation.token, revocation.token_type_hint) == (token, "access_token")
    assert revocation.authenticated
    assert provider.access_token_expires_at(token) is None  # revoked there
    assert (await broker.grant("del"))[0] == 404
    assert provider.token_requests == 1


async def test_an_access_token_alone_can_be_imported(broker: Broker, provider: DevProvider) -> None:
    status, grant = await broker.import_grant("im", access_token="at-imported", scope="public")
    assert status == 201
    assert (grant["has_refresh_token"], grant["access_expires_at"]) == (False, None)
    status, answer = await broker.token("im")
    assert (answer["access_token"], answer["expires_in"], answer["scope"]) == (
        "at-imported",
        None,
        "public",
    )
    status, grant = await broker.import_grant("im", access_token="at-short", expires_in=60)
    assert status == 200
    assert 55 <= (await broker.token("im", min_ttl=600))[1]["expires_in"] <= 60
    broker.clock.advance(61)
    assert (await broker.token("im"))[0] == 409
    assert provider.token_requests == 0  # nothing to validate: never a provider call


async def test_an_imported_expires_at_is_checked(broker: Broker, provider: DevProvider) -> None:
    later = "2100-01-01T00:00:00Z"
    status, problem = await broker.import_grant("at", access_token="a", expires_at=later)
    assert (status, problem["code"]) == (400, "invalid_request")  # further than a year ahead
    status, problem = await broker.import_grant(
        "at", access_token="a", expires_at="2000-01-01T00:00:00+00:00"
    )
    assert (status, problem["code"]) == (400, "invalid_request")
    assert "future" in problem["detail"]
    for body in (
        {"access_token": "a", "expires_at": "2030-01-01T00:00:00"},  # no time zone
        {"access_token": "a", "expires_at": "soon"},
        {"access_token": "a", "expires_in": 60, "expires_at": later},
        {"refresh_token": "r", "expires_at": later},
        {"scope": "public"},
    ):
        status, problem = await broker.import_grant("at", **body)
        assert (status, problem["code"]) == (400, "invalid_request"), body
    assert (await broker.grant("at"))[0] == 404
    soon = broker.clock() + 120
    status, grant = await broker.import_grant("at", access_token="a", expires_at=iso(soon))
    assert status == 201
    assert grant["access_expires_at"] == iso(soon)


async def test_a_provider_may_require_refresh_tokens(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    like_cloud66(provider)
    broker = await make_broker(
        port=free_port(),
        redirect_allowlist=[landing.url + "/"],
        provider={"require_refresh_token": True},
    )
    journey = await connect(broker, browser, "rq", landing.url + "/")
    assert journey.query == {"status": "error", "code": "no_refresh_token", "provider": "dev"}
    assert (await broker.grant("rq"))[0] == 404
    status, problem = await broker.import_grant("rq", access_token="a")
    assert (status, problem["code"]) == (400, "invalid_request")
    assert "require_refresh_token" in problem["detail"]


async def test_the_scheduler_never_refreshes_them_and_marks_an_expired_one(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    broker = await make_broker(
        port=free_port(),
        redirect_allowlist=[landing.url + "/"],
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        **FAST,
    )
    like_cloud66(provider)
    await connected(broker, browser, landing, "forever")
    like_cloud66(provider, expires_in=600)
    await connected(broker, browser, landing, "expiring")
    assert provider.token_requests == 2
    scheduler = broker.app[SCHEDULER]

    async def counted() -> dict[str, float]:
        """What ``broker_grants`` reports, from the indexes."""
        return await broker.app[STORE].schedule.schedule_stats("dev", broker.clock(), 0)

    assert (await counted())["scheduled"] == 2  # both active, neither ever due

    async def ticks(n: int) -> None:
        target = scheduler.ticks + n

        async def looked() -> bool:
            return scheduler.ticks >= target

        await eventually(looked, f"{n} scheduler ticks", within=10)

    await ticks(10)
    broker.clock.advance(300)  # where a refreshable grant would be refreshed
    await ticks(10)
    assert (await broker.grant("expiring"))[1]["state"] == "active"
    broker.clock.advance(301)  # past the stated expiry

    async def marked() -> bool:
        _, grant = await broker.grant("expiring")
        return bool(grant["state"] == "reauth_required")

    await eventually(marked, "the expired grant marked by the scheduler", within=10)
    stats = await counted()
    assert (stats["scheduled"], stats["reauth_required"], stats["lag"]) == (1, 1, 0)
    broker.clock.advance(400 * DAY)
    await ticks(10)
    assert (await broker.grant("forever"))[1]["state"] == "active"
    assert provider.token_requests == 2  # the two code exchanges, nothing else
    assert provider.refresh_requests == 0


async def test_replicas_seeing_it_expire_together_mark_it_once(
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    key = encryption_key()
    shared = {"redis_url": redis_server.url, "key_prefix": key_prefix, "encryption_keys": key}
    first = await make_broker(**shared)
    second = await make_broker(clock=first.clock, **shared)
    await first.import_grant("both", access_token="at-both", expires_in=60)
    store = first.app[STORE]
    imported = await store.read("dev", "both")
    assert imported is not None
    first.clock.advance(61)  # one clock: both replicas see it expired
    answers = await asyncio.gather(
        *(replica.token("both", min_ttl=0) for replica in (first, second) for _ in range(10)),
        *(
            replica.call("POST", path("tokens", "both") + "/refresh", json={"rejected_token": "x"})
            for replica in (first, second)
        ),
    )
    assert {answer[0] for answer in answers} == {409}
    marked = await store.read("dev", "both")
    assert marked is not None
    assert (marked.state, marked.version) == ("reauth_required", imported.version + 1)
    assert provider.token_requests == 0
