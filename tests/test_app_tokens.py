"""App tokens (GET /v1/app-tokens/{provider}, the client-credentials grant) against the dev
provider and a real Redis (and the embedded memory:// store where the test says so)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import redis.asyncio as aioredis

from broker.api import APP_SCHEDULER
from broker.app_store import scope_id
from broker.config import build_settings
from broker.devprovider import DevProvider
from broker.errors import ConfigError
from broker.keys import Keys
from tests.clients import api_key, bearer, client
from tests.conftest import (
    FAST_SCHEDULER as FAST,
)
from tests.conftest import (
    Broker,
    BrokerFactory,
    Clock,
    RedisServer,
    encryption_key,
    eventually,
    metric,
)

ENABLED = {"client_credentials": True}


async def app_token(
    broker: Broker, scope: str | None = None, min_ttl: int | None = None, **kwargs: Any
) -> tuple[int, Any, Any]:
    query = []
    if scope is not None:
        query.append("scope=" + quote(scope, safe=""))
    if min_ttl is not None:
        query.append(f"min_ttl={min_ttl}")
    url = "/v1/app-tokens/dev" + ("?" + "&".join(query) if query else "")
    return await broker.call("GET", url, **kwargs)


def in_flight(broker: Broker) -> float:
    return metric(broker, "broker_http_requests_in_flight")


async def shared_pair(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str, **extra: Any
) -> tuple[Broker, Broker]:
    """Two replicas: one Redis, one key prefix, one key ring, one clock."""
    shared: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": key_prefix,
        "encryption_keys": encryption_key(),
        "clock": Clock(),
        "provider": ENABLED,
        **extra,
    }
    return await make_broker(**shared), await make_broker(**shared)


async def test_an_app_token_is_fetched_once_then_served_from_the_cache(
    make_broker: BrokerFactory, provider: DevProvider, store_url: dict[str, str]
) -> None:
    broker = await make_broker(provider=ENABLED, **store_url)
    status, first, headers = await app_token(broker)
    assert status == 200, first
    assert headers["Cache-Control"] == "no-store"
    assert first["token_type"] == "Bearer"
    assert first["scope"] == "public_api"  # the provider's default, as it answered
    assert 3590 <= first["expires_in"] <= 3600
    assert provider.access_token_expires_at(first["access_token"]) is not None
    assert provider.client_credentials_requests == 1
    assert provider.auth_methods_seen == ["client_secret_basic"]
    status, second, _ = await app_token(broker)
    assert (status, second["access_token"]) == (200, first["access_token"])
    assert provider.client_credentials_requests == 1
    assert metric(broker, "broker_app_token_handouts_total", provider="dev", client="svc") == 2
    assert (
        metric(
            broker,
            "broker_app_token_requests_total",
            provider="dev",
            outcome="success",
            trigger="on_demand",
        )
        == 1
    )


async def test_client_secret_post_is_used_when_configured(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    provider.settings.client_auth = "client_secret_post"
    broker = await make_broker(provider={**ENABLED, "client_auth": "client_secret_post"})
    status, body, _ = await app_token(broker)
    assert status == 200, body
    assert provider.auth_methods_seen == ["client_secret_post"]


async def test_each_scope_set_is_its_own_token_whatever_the_order(
    make_broker: BrokerFactory, provider: DevProvider, store_url: dict[str, str]
) -> None:
    broker = await make_broker(provider=ENABLED, **store_url)
    _, read, _ = await app_token(broker, "read")
    _, both, _ = await app_token(broker, "read write")
    _, default, _ = await app_token(broker)
    assert (read["scope"], both["scope"], default["scope"]) == ("read", "read write", "public_api")
    assert len({read["access_token"], both["access_token"], default["access_token"]}) == 3
    assert provider.client_credentials_requests == 3
    # the same set, another order and duplicates: the same token, no new request
    _, again, _ = await app_token(broker, "write  read write")
    assert again["access_token"] == both["access_token"]
    _, empty, _ = await app_token(broker, "")
    assert empty["access_token"] == default["access_token"]
    assert provider.client_credentials_requests == 3


async def test_min_ttl_forces_a_new_token(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(provider=ENABLED)
    _, first, _ = await app_token(broker)
    broker.clock.advance(3500)  # 100 s left
    _, kept, _ = await app_token(broker, min_ttl=60)
    assert kept["access_token"] == first["access_token"]
    assert 90 <= kept["expires_in"] <= 100
    status, fresh, _ = await app_token(broker, min_ttl=300)
    assert status == 200
    assert fresh["access_token"] != first["access_token"]
    assert fresh["expires_in"] >= 3590
    assert provider.client_credentials_requests == 2


async def test_concurrent_requests_on_two_replicas_cause_one_provider_call(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    a, b = await shared_pair(make_broker, redis_server, key_prefix)
    provider.hold()
    calls = [asyncio.create_task(app_token(r, "read")) for r in (a, b) for _ in range(10)]
    await provider.wait_for_token_requests(1)

    async def both_waiting() -> bool:
        return in_flight(a) == 10 and in_flight(b) == 10

    await eventually(both_waiting, "both replicas waiting")
    provider.release()
    results = await asyncio.gather(*calls)
    assert {status for status, _, _ in results} == {200}
    assert len({body["access_token"] for _, body, _ in results}) == 1
    assert provider.client_credentials_requests == 1


async def test_the_scheduler_refreshes_a_token_in_use_before_it_expires(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    a, b = await shared_pair(make_broker, redis_server, key_prefix, **FAST)
    _, first, _ = await app_token(a, "read")
    a.clock.advance(3600 - 250)  # due 300..360 s before expiry: now 250 s before

    async def refreshed() -> bool:
        return provider.client_credentials_requests == 2

    await eventually(refreshed, "the scheduled refresh")
    for replica in (a, b):  # served from the store by either replica, no request
        _, now, _ = await app_token(replica, "read", min_ttl=3000)
        assert now["access_token"] != first["access_token"]
        assert now["expires_in"] >= 3590
    assert provider.client_credentials_requests == 2
    scheduled = sum(
        metric(
            r,
            "broker_app_token_requests_total",
            provider="dev",
            outcome="success",
            trigger="scheduled",
        )
        for r in (a, b)
    )
    assert scheduled == 1


async def test_a_token_nobody_uses_is_not_refreshed_again(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, provider=ENABLED, **FAST
    )
    await app_token(broker)
    broker.clock.advance(3600 - 250)

    async def refreshed() -> bool:
        return provider.client_credentials_requests == 2

    await eventually(refreshed, "the scheduled refresh")
    broker.clock.advance(3600)  # due again, but nobody was handed the refreshed token
    scheduler = broker.app[APP_SCHEDULER]
    client = aioredis.Redis.from_url(redis_server.url)
    try:

        async def unscheduled() -> bool:
            return await client.zcard(f"{key_prefix}:app-schedule") == 0

        await eventually(unscheduled, "the idle token to leave the schedule")
    finally:
        await client.aclose()
    ticks = scheduler.ticks

    async def looked_again() -> bool:
        return scheduler.ticks >= ticks + 3

    await eventually(looked_again, "more scheduler ticks")
    assert provider.client_credentials_requests == 2
    # asked for again: fetched on demand, and in the schedule again
    status, _, _ = await app_token(broker)
    assert status == 200
    assert provider.client_credentials_requests == 3


async def test_a_still_valid_token_is_served_while_the_provider_is_down(
    make_broker: BrokerFactory, provider: DevProvider, store_url: dict[str, str]
) -> None:
    broker = await make_broker(provider=ENABLED, **store_url)
    _, first, _ = await app_token(broker)
    provider.fail_always("server_error")
    broker.clock.advance(3500)
    status, kept, _ = await app_token(broker, min_ttl=300)
    assert status == 200
    assert kept["access_token"] == first["access_token"]
    assert kept["expires_in"] <= 100
    broker.clock.advance(200)  # expired now
    status, problem, headers = await app_token(broker)
    assert (status, problem["code"]) == (503, "upstream_unavailable")
    assert int(headers["Retry-After"]) >= 1
    provider.heal()
    status, fresh, _ = await app_token(broker)
    assert status == 200
    assert fresh["access_token"] != first["access_token"]


@pytest.mark.parametrize("kind", ["garbage", "no_access_token", "rate_limited", "invalid_client"])
async def test_a_failing_answer_never_wipes_the_cached_token(
    make_broker: BrokerFactory, provider: DevProvider, kind: Any, store_url: dict[str, str]
) -> None:
    broker = await make_broker(provider=ENABLED, **store_url)
    _, first, _ = await app_token(broker)
    broker.clock.advance(3500)
    provider.fail_next(kind)
    status, kept, _ = await app_token(broker, min_ttl=300)
    assert (status, kept["access_token"]) == (200, first["access_token"])
    assert provider.client_credentials_requests == 2
    status, again, _ = await app_token(broker, min_ttl=0)
    assert (status, again["access_token"]) == (200, first["access_token"])


async def test_the_first_fetch_failing_is_a_503_with_retry_after(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(provider=ENABLED)
    provider.fail_next("rate_limited", retry_after=7)
    status, problem, headers = await app_token(broker)
    assert (status, problem["code"], headers["Retry-After"]) == (503, "upstream_unavailable", "7")


async def test_a_provider_without_client_credentials_answers_404(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker()
    status, problem, _ = await app_token(broker)
    assert (status, problem["code"]) == (404, "app_token_not_configured")
    status, problem, _ = await broker.call("GET", "/v1/app-tokens/nosuch")
    assert (status, problem["code"]) == (404, "provider_not_found")
    assert provider.token_requests == 0


async def test_clients_need_tokens_read_and_the_provider(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    keys = {name: api_key() for name in ("admin", "writer", "elsewhere")}

    dev = {
        "token_url": provider.token_url,
        "client_id": provider.settings.client_id,
        "client_secret": provider.settings.client_secret,
        "client_credentials": True,
    }
    broker = await make_broker(
        providers={"dev": dev, "other": {**dev, "client_credentials": False}},
        clients=[
            client("admin", keys["admin"], permissions=["tokens:read"]),
            client(
                "writer",
                keys["writer"],
                providers=["dev"],
                permissions=["grants:write", "grants:read"],
            ),
            client(
                "elsewhere", keys["elsewhere"], providers=["other"], permissions=["tokens:read"]
            ),
        ],
    )
    for name, expected in (("writer", 403), ("elsewhere", 403), ("admin", 200)):
        status, body, _ = await app_token(broker, headers=bearer(keys[name]))
        assert status == expected, (name, body)
        if expected == 403:
            assert body["code"] == "forbidden"
    status, _, headers = await app_token(broker, headers={"Authorization": "Bearer nope"})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert provider.client_credentials_requests == 1


@pytest.mark.parametrize("scope", ['a"b', "a\\b", "a\tb", "é", "x" * 513])
async def test_a_malformed_scope_is_400(
    make_broker: BrokerFactory, provider: DevProvider, scope: str
) -> None:
    broker = await make_broker(provider=ENABLED)
    status, problem, _ = await app_token(broker, scope)
    assert (status, problem["code"]) == (400, "invalid_request")
    assert provider.token_requests == 0


async def test_a_scope_the_provider_refuses_is_400(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    provider.settings.grantable_scopes = ("read",)
    broker = await make_broker(provider=ENABLED)
    assert (await app_token(broker, "read"))[0] == 200
    status, problem, _ = await app_token(broker, "read admin")
    assert (status, problem["code"]) == (400, "invalid_request")
    assert "invalid_scope" in problem["detail"]


async def test_the_record_is_encrypted_and_bound_to_its_scope(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix, provider=ENABLED)
    _, ab, _ = await app_token(broker, "b a")
    _, c, _ = await app_token(broker, "c")
    ab_key = f"{key_prefix}:{{app:dev:{scope_id('a b')}}}:token"  # as documented
    c_key = f"{key_prefix}:{{app:dev:{scope_id('c')}}}:token"
    pattern = Keys(key_prefix).app_token_pattern()  # what a key rotation scans for
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        found = {k.decode() async for k in client.scan_iter(match=pattern)}
        assert found == {ab_key, c_key}
        record = await client.hgetall(ab_key)
        assert set(record) >= {b"v", b"blob", b"due", b"st", b"used"}
        assert record[b"blob"][0] == 1  # the key ring's record format, as grants'
        assert ab["access_token"].encode() not in record[b"blob"]
        # dropped by Redis a day after its token expires, when nobody renewed it
        assert 86400 * 1000 < await client.pttl(ab_key) <= (3600 + 86400) * 1000
        # "a b"'s ciphertext under "c"'s key fails authentication: never served for "c"
        await client.hset(c_key, "blob", record[b"blob"])
    finally:
        await client.aclose()
    _, again, _ = await app_token(broker, "a b")
    assert again["access_token"] == ab["access_token"]
    status, replaced, _ = await app_token(broker, "c")
    assert status == 200
    assert replaced["access_token"] not in (ab["access_token"], c["access_token"])
    assert provider.client_credentials_requests == 3
    assert metric(broker, "broker_grants_unreadable_total", provider="dev") >= 1


async def test_the_dev_provider_checks_client_authentication_for_client_credentials(
    provider: DevProvider,
) -> None:
    s = provider.settings

    def basic(secret: str) -> dict[str, str]:
        pair = base64.b64encode(f"{s.client_id}:{secret}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}

    async with aiohttp.ClientSession() as session:
        form = {"grant_type": "client_credentials", "scope": "b a"}
        async with session.post(
            provider.token_url, data=form, headers=basic(s.client_secret)
        ) as response:
            body = await response.json()
            assert response.status == 200
            assert (body["scope"], "refresh_token" in body) == ("b a", False)
        async with session.post(provider.token_url, data=form, headers=basic("wrong")) as response:
            assert (response.status, (await response.json())["error"]) == (401, "invalid_client")
        posted = {**form, "client_id": s.client_id, "client_secret": s.client_secret}
        async with session.post(provider.token_url, data=posted) as response:
            assert response.status == 401  # configured for basic: post is another method
        s.client_auth = "client_secret_post"
        s.client_token_ttl = 60
        async with session.post(provider.token_url, data=posted) as response:
            body = await response.json()
            assert (response.status, body["expires_in"]) == (200, 60)
        s.client_credentials = False
        async with session.post(provider.token_url, data=posted) as response:
            assert (await response.json())["error"] == "unsupported_grant_type"
    assert provider.client_credentials_requests == 5


async def test_an_open_circuit_stops_calls_and_serves_the_valid_token(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(provider=ENABLED, circuit_failures=2, circuit_open_for=60)
    _, first, _ = await app_token(broker)
    broker.clock.advance(3500)
    provider.fail_always("server_error")
    for _ in range(4):
        status, kept, _ = await app_token(broker, min_ttl=300)
        assert (status, kept["access_token"]) == (200, first["access_token"])
    assert provider.client_credentials_requests == 1 + 2  # then the circuit opened
    assert (
        metric(
            broker,
            "broker_app_token_requests_total",
            provider="dev",
            outcome="circuit_open",
            trigger="on_demand",
        )
        == 2
    )
    broker.clock.advance(200)  # expired, circuit still open: no call, a clear 503
    status, problem, headers = await app_token(broker)
    assert (status, problem["code"]) == (503, "upstream_unavailable")
    assert int(headers["Retry-After"]) >= 1
    assert provider.client_credentials_requests == 3


async def test_redis_down_is_a_503_store_unavailable(
    make_broker: BrokerFactory, provider: DevProvider, own_redis: RedisServer
) -> None:
    broker = await make_broker(redis_url=own_redis.url, redis_timeout=0.5, provider=ENABLED)
    assert (await app_token(broker))[0] == 200
    own_redis.stop()
    status, problem, headers = await app_token(broker)
    assert (status, problem["code"]) == (503, "store_unavailable")
    assert "Retry-After" in headers
    assert provider.client_credentials_requests == 1


def test_app_tokens_need_a_client_secret() -> None:
    table = {"token_url": "https://idp.example/token", "client_id": "b", "client_credentials": True}
    with pytest.raises(ConfigError) as caught:
        build_settings({"providers": {"p": table}}, {}, base_dir=Path.cwd())
    assert caught.value.setting == "providers.p.client_credentials"
    assert "client secret" in str(caught.value)


async def test_a_provider_slower_than_provider_timeout_leaves_the_token_served(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    timeouts = {"provider_timeout": 0.5, "rotated_write_window": 1.0, "redis_timeout": 0.5}
    broker = await make_broker(provider=ENABLED, **timeouts)
    _, first, _ = await app_token(broker)
    broker.clock.advance(3500)
    provider.fail_next("slow", delay=5)
    status, kept, _ = await app_token(broker, min_ttl=300)
    assert (status, kept["access_token"]) == (200, first["access_token"])
    status, fresh, _ = await app_token(broker, min_ttl=300)  # the next request gets through
    assert status == 200
    assert fresh["access_token"] != first["access_token"]


async def test_the_scheduler_retries_a_failed_renewal_until_the_provider_is_back(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        provider=ENABLED,
        circuit_failures=1000,
        **FAST,
    )
    _, first, _ = await app_token(broker)
    provider.fail_always("server_error")
    broker.clock.advance(3600 - 250)

    def scheduled(outcome: str) -> float:
        return metric(
            broker,
            "broker_app_token_requests_total",
            provider="dev",
            outcome=outcome,
            trigger="scheduled",
        )

    async def failed_twice() -> bool:
        return scheduled("transient") >= 2

    await eventually(failed_twice, "two failed scheduled renewals")
    status, kept, _ = await app_token(broker, min_ttl=0)
    assert (status, kept["access_token"]) == (200, first["access_token"])
    provider.heal()

    async def renewed() -> bool:
        return scheduled("success") == 1

    await eventually(renewed, "the renewal once the provider is back")
    status, fresh, _ = await app_token(broker, min_ttl=3000)
    assert status == 200
    assert fresh["access_token"] != first["access_token"]
    assert scheduled("success") == 1
