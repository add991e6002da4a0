"""Clients' keys (lists for rotation), ``user_ids`` globs and rate limits, on real Redis (and
the embedded store where it matters); the limiter's isolation across two ``broker serve``
processes and its fail-open under a Redis cut off."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis as syncredis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.api import METRICS
from broker.app import create_app
from broker.auth import hash_key
from broker.devprovider import DevProvider
from broker.keys import Keys
from broker.middlewares import RATE_LIMITER
from broker.ratelimit import RateLimiter
from tests.clients import api_key, bearer, client
from tests.conftest import (
    PROVIDER,
    Broker,
    BrokerFactory,
    RedisServer,
    broker_settings,
    path,
)
from tests.faults import TcpProxy
from tests.fleet import start_fleet, stop_fleet


async def status_of(broker: Broker, key: str, method: str, url: str, **kwargs: Any) -> int:
    status, _, _ = await broker.call(method, url, headers=bearer(key), **kwargs)
    return status


# -- keys -------------------------------------------------------------------------------------


async def test_every_key_of_a_list_works_and_no_other(
    make_broker: BrokerFactory, store_url: dict[str, str]
) -> None:
    current, upcoming, stranger = api_key(), api_key(), api_key()
    broker = await make_broker(clients=[client("rotating", current, upcoming)], **store_url)
    for key in (current, upcoming):
        status, body, _ = await broker.call("GET", path("grants", "u-1"), headers=bearer(key))
        assert (status, body["code"]) == (404, "grant_not_found")  # authenticated
    status, body, headers = await broker.call(
        "GET", path("grants", "u-1"), headers=bearer(stranger)
    )
    assert (status, body["code"]) == (401, "unauthenticated")
    assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_one_key_in_two_places_is_refused(provider: DevProvider) -> None:
    from broker.errors import ConfigError

    shared, other = api_key(), api_key()
    with pytest.raises(ConfigError) as caught:
        broker_settings(
            provider,
            api_key_hash=hash_key(other),
            clients=[client("a", shared, other), client("b", shared)],
        )
    assert caught.value.setting == "clients.b.key_sha256"


# -- user ids ---------------------------------------------------------------------------------

PATTERNS = ["team/*", "exact?id", "lit[*]", "équipe:[0-9]"]
ALLOWED = [
    "team/",
    "team/a/b",
    "team/../other",  # no path semantics: '..' and '/' are characters like any other
    "team/*",
    "exactXid",
    "exact/id",
    "lit*",
    "équipe:7",
]
REFUSED = [
    "other/team/x",
    "..",
    "team",
    "Team/a",  # case-sensitive
    "exactid",
    "exactXXid",
    "litx",
    "lit",
    "Équipe:7",
    "équipe:77",
    "*",
]


@pytest.fixture
async def restricted(make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str) -> Any:
    """A broker with an unrestricted client (``admin``) and one restricted to PATTERNS."""
    admin, team = api_key(), api_key()
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        clients=[client("admin", admin), client("team", team, user_ids=PATTERNS)],
    )
    return broker, admin, team


@pytest.mark.parametrize("user_id", REFUSED)
async def test_user_ids_outside_the_patterns_are_forbidden_everywhere(
    restricted: Any, user_id: str
) -> None:
    broker, _, team = restricted
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", path("tokens", user_id), {}),
        ("POST", path("tokens", user_id) + "/refresh", {"json": {"rejected_token": "x"}}),
        ("GET", path("grants", user_id), {}),
        ("PUT", path("grants", user_id), {"json": {"refresh_token": "rt"}}),
        ("DELETE", path("grants", user_id), {}),
        (
            "POST",
            f"/v1/authorizations/{PROVIDER}",
            {"json": {"user_id": user_id, "redirect_after": "https://app.example/done"}},
        ),
    ]
    for method, url, kwargs in calls:
        status, body, _ = await broker.call(method, url, headers=bearer(team), **kwargs)
        assert (status, body["code"]) == (403, "forbidden"), (method, url)


@pytest.mark.parametrize("user_id", ALLOWED)
async def test_user_ids_matching_a_pattern_are_served(
    restricted: Any, provider: DevProvider, user_id: str
) -> None:
    broker, _, team = restricted
    refresh_token = provider.issue_refresh_token(user_id)
    status, _, _ = await broker.call(
        "PUT", path("grants", user_id), headers=bearer(team), json={"refresh_token": refresh_token}
    )
    assert status == 201
    status, body, _ = await broker.call("GET", path("tokens", user_id), headers=bearer(team))
    assert status == 200
    assert body["access_token"]
    assert await status_of(broker, team, "GET", path("grants", user_id)) == 200
    assert await status_of(broker, team, "DELETE", path("grants", user_id)) == 204


async def test_a_restricted_client_lists_only_its_user_ids(
    restricted: Any, provider: DevProvider
) -> None:
    broker, admin, team = restricted
    for user_id in [*ALLOWED, *REFUSED]:
        token = provider.issue_refresh_token(user_id)
        status, _, _ = await broker.call(
            "PUT", path("grants", user_id), headers=bearer(admin), json={"refresh_token": token}
        )
        assert status == 201

    async def listed(key: str) -> list[str]:
        found: list[str] = []
        cursor: str | None = None
        for _ in range(100):
            query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
            status, body, _ = await broker.call(
                "GET", f"/v1/grants/{PROVIDER}{query}", headers=bearer(key)
            )
            assert status == 200
            found += [grant["user_id"] for grant in body["grants"]]
            cursor = body["next_cursor"]
            if cursor is None:
                return found
        raise AssertionError("the listing did not end")

    assert sorted(await listed(team)) == sorted(ALLOWED)
    assert sorted(await listed(admin)) == sorted([*ALLOWED, *REFUSED])


# -- rate limits ------------------------------------------------------------------------------


async def test_a_client_over_its_limit_gets_429_and_others_do_not(
    make_broker: BrokerFactory, store_url: dict[str, str]
) -> None:
    limited, other = api_key(), api_key()
    # one request per 100 s after a burst of 3: nothing refills during the test
    broker = await make_broker(
        clients=[
            client("limited", limited, rate_limit={"requests_per_second": 0.01, "burst": 3}),
            client("other", other, rate_limit={"requests_per_second": 0.01, "burst": 100}),
        ],
        **store_url,
    )
    url = path("grants", "u-1")
    statuses = [await status_of(broker, limited, "GET", url) for _ in range(3)]
    assert statuses == [404, 404, 404]
    status, body, headers = await broker.call("GET", url, headers=bearer(limited))
    assert (status, body["code"]) == (429, "rate_limited")
    assert body["type"] == "urn:broker:problem:rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 100
    assert [await status_of(broker, other, "GET", url) for _ in range(10)] == [404] * 10
    if "key_prefix" in store_url:  # the bucket lives under the store's prefix, in a slot of its own
        redis = syncredis.Redis.from_url(store_url["redis_url"])
        bucket = Keys(store_url["key_prefix"]).rate_limit_key("limited")
        assert bucket.startswith(store_url["key_prefix"] + ":{")
        assert redis.exists(bucket)
        redis.close()
    text = broker.app[METRICS].render().decode()
    assert counted(text, 'broker_rate_limited_total{client="limited"}') == 1
    assert counted(text, 'broker_rate_limited_total{client="other"}') == 0
    # a client without rate_limit is never counted, a 401 never reaches the limiter
    status, _, _ = await broker.call("GET", url, headers=bearer(api_key()))
    assert status == 401


@pytest.fixture
async def redis_proxy(redis_server: RedisServer) -> AsyncIterator[TcpProxy]:
    target = urlsplit(redis_server.url)
    assert target.hostname is not None
    assert target.port is not None
    async with TcpProxy(target.hostname, target.port) as proxy:
        yield proxy


def counted(text: str, sample: str) -> float:
    """The value of one sample (``name{labels}``) in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


async def test_the_limiter_fails_open_when_its_redis_is_cut_off(
    provider: DevProvider, redis_server: RedisServer, key_prefix: str, redis_proxy: TcpProxy
) -> None:
    """Grants stay reachable; only the limiter's Redis connection goes through the proxy,
    which first stops answering (slow), then refuses connections (down)."""
    key = api_key()
    settings = broker_settings(
        provider,
        api_key_hash=hash_key(key),
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        rate_limit_timeout=0.2,
        clients=[client("svc", key, rate_limit={"requests_per_second": 0.01, "burst": 1})],
    )
    app = create_app(settings)
    limiter_redis = aioredis.Redis.from_url(redis_proxy.url_for_redis(), socket_timeout=5)

    async def proxied_limiter(app: web.Application) -> AsyncIterator[None]:
        app[RATE_LIMITER] = RateLimiter(
            limiter_redis, Keys(key_prefix), app[METRICS], timeout=0.2, fail_open_for=0.2
        )
        yield
        await limiter_redis.aclose()

    app.cleanup_ctx.append(proxied_limiter)
    async with TestClient(TestServer(app)) as http:

        async def get() -> int:
            async with http.get(path("grants", "u-1"), headers=bearer(key)) as response:
                return response.status

        assert [await get(), await get()] == [404, 429]
        redis_proxy.blackhole()
        # the bucket is empty, but the limiter cannot tell: every request goes through
        assert [await get() for _ in range(5)] == [404] * 5
        failures = counted(app[METRICS].render().decode(), "broker_rate_limiter_failures_total")
        assert failures >= 1
        redis_proxy.heal()
        statuses = []
        for _ in range(100):  # until the limiter checks again (after fail_open_for)
            statuses.append(await get())
            if statuses[-1] == 429:
                break
            await asyncio.sleep(0.05)
        assert statuses[-1] == 429
        assert set(statuses) <= {404, 429}
        await redis_proxy.close()  # now refused outright: still through, still counted
        assert [await get() for _ in range(3)] == [404] * 3
        text = app[METRICS].render().decode()
        assert counted(text, "broker_rate_limiter_failures_total") > failures


# -- two replicas -----------------------------------------------------------------------------

FLOOD_BURST = 20
FLOOD_RATE = 2.0  # per second


async def test_a_flooding_client_does_not_starve_another_across_two_processes(
    provider: DevProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    flood, calm = api_key(), api_key()
    extra = "".join(
        f"""
[[clients]]
name = "{name}"
key_sha256 = "{hash_key(key)}"
providers = ["dev"]
permissions = ["grants:read"]
rate_limit = {{ requests_per_second = {rate}, burst = {burst} }}
"""
        for name, key, rate, burst in (
            ("flood", flood, FLOOD_RATE, FLOOD_BURST),
            ("calm", calm, 10000, 10000),
        )
    )
    fleet = await start_fleet(
        provider,
        [redis_server.url, redis_server.url],
        tmp_path,
        {"rate_limit_timeout": 2.0},
        extra_toml=extra,
    )
    try:
        urls = [replica.url for replica in fleet.replicas]
        outcomes: dict[str, Counter[int]] = {"flood": Counter(), "calm": Counter()}
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as http:

            async def hammer(name: str, key: str, n: int, worker: int) -> None:
                for i in range(n):
                    url = urls[(i + worker) % 2] + path("grants", f"u-{worker}")
                    async with http.get(url, headers=bearer(key)) as response:
                        outcomes[name][response.status] += 1

            started = loop.time()
            await asyncio.gather(
                *(hammer("flood", flood, 40, w) for w in range(8)),
                *(hammer("calm", calm, 25, w) for w in range(2)),
            )
            elapsed = loop.time() - started
        assert outcomes["calm"] == Counter({404: 50}), outcomes
        assert set(outcomes["flood"]) == {404, 429}, outcomes
        # One bucket for both processes: at most the burst plus what refilled meanwhile
        # (two buckets would let up to twice the burst through).
        assert outcomes["flood"][404] <= FLOOD_BURST + FLOOD_RATE * elapsed + 1, (
            outcomes,
            elapsed,
        )
    finally:
        await stop_fleet(fleet)
    for replica in fleet.replicas:
        assert "ratelimit.failing_open" not in replica.events()
