"""The grant cache of the token hot path (broker/grant_cache.py): a replica answers from the
grants it read lately, and drops them when any replica changes them.

Across real processes: two `broker serve` replicas on one redis-server, a change made through
one and read through the other. The cache is set to keep grants for a minute, so a change that
shows within a second was carried by the change channel, not by the cache's age limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from broker.api import STORE
from broker.devprovider import DevProvider
from broker.grant_cache import DEAF_AFTER, HEARD_WITHIN, GrantCache
from broker.keys import Keys
from broker.models import Grant
from tests.conftest import Broker, BrokerFactory, RedisServer, eventually, metric, path
from tests.faults import TcpProxy
from tests.fleet import Fleet, Replica, start_fleet, stop_fleet

PROPAGATION = 1.0  # seconds a change on one replica may take to show on another (documented: ms)
GRANT_A, GRANT_B = cast(Grant, object()), cast(Grant, object())


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live_cache(max_age: float = 5.0, entries: int = 10) -> tuple[GrantCache, Ticks]:
    ticks = Ticks()
    cache = GrantCache(max_age, entries, clock=ticks)
    cache.reset(live=True)
    cache.heard()
    return cache, ticks


def test_a_grant_is_kept_for_max_age_at_most() -> None:
    cache, ticks = live_cache(max_age=5.0)
    cache.put("k", GRANT_A, cache.generation)
    ticks.now += 2.9
    cache.heard()
    assert cache.get("k") is GRANT_A
    ticks.now += 2.1
    assert cache.get("k") is None


def test_a_read_that_raced_a_change_is_not_kept() -> None:
    cache, _ = live_cache()
    generation = cache.generation  # the read starts...
    cache.invalidate("other")  # ...a change is heard before its answer is back
    cache.put("k", GRANT_A, generation)
    assert cache.get("k") is None
    cache.put("k", GRANT_B, cache.generation)
    assert cache.get("k") is GRANT_B


def test_nothing_is_kept_or_served_unless_the_listener_is_subscribed_and_heard() -> None:
    cache, ticks = live_cache()
    cache.put("k", GRANT_A, cache.generation)
    ticks.now += HEARD_WITHIN + 0.1  # the listener's connection went silent
    assert cache.get("k") is None
    cache.heard()
    assert cache.get("k") is GRANT_A  # heard again on the same connection: nothing was missed
    cache.reset(live=False)
    assert cache.get("k") is None
    cache.put("k", GRANT_A, cache.generation)
    assert len(cache) == 0
    off = GrantCache(0, 10)
    off.reset(live=True)
    off.put("k", GRANT_A, off.generation)
    assert len(off) == 0


def test_an_entry_asked_for_late_in_its_life_is_read_again_once() -> None:
    cache, ticks = live_cache(max_age=4.0)
    cache.put("k", GRANT_A, cache.generation)
    ticks.now += 2.9
    assert cache.lookup("k") == (GRANT_A, False)  # early in its life
    ticks.now += 0.2  # the last quarter: one caller reads it again, the others are served
    cache.heard()
    assert cache.lookup("k") == (GRANT_A, True)
    assert cache.lookup("k") == (GRANT_A, False)
    cache.renewed("k")  # that read raced a change: nothing kept, the next caller tries again
    assert cache.lookup("k") == (GRANT_A, True)
    cache.put("k", GRANT_B, cache.generation)
    cache.renewed("k")
    assert cache.lookup("k") == (GRANT_B, False)  # a new entry, its own life
    cache.put("k", None, cache.generation)  # read again: the grant is gone
    assert cache.lookup("k") == (None, False)


def test_the_oldest_grants_go_first_when_full() -> None:
    cache, _ = live_cache(entries=2)
    for key in ("a", "b", "c"):
        cache.put(key, GRANT_A, cache.generation)
    assert [cache.get(k) is not None for k in ("a", "b", "c")] == [False, True, True]


# Across processes -------------------------------------------------------------------------


@pytest.fixture
async def pair(
    provider: DevProvider, own_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[Fleet]:
    fleet = await start_fleet(provider, [own_redis.url] * 2, tmp_path, {"token_cache_seconds": 60})
    try:
        yield fleet
    finally:
        await stop_fleet(fleet)


async def call(
    http: aiohttp.ClientSession, fleet: Fleet, replica: Replica, method: str, url: str, **kw: Any
) -> tuple[int, Any]:
    async with http.request(method, replica.url + url, headers=fleet.headers, **kw) as response:
        return response.status, await response.json(content_type=None)


async def scrape(http: aiohttp.ClientSession, replica: Replica, name: str, **labels: str) -> float:
    async with http.get(replica.url + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_a_change_on_one_replica_reaches_the_other_replicas_cache(
    pair: Fleet, provider: DevProvider
) -> None:
    a, b = pair.replicas
    user = "cached-user"
    async with aiohttp.ClientSession() as http:

        async def put(access_token: str) -> None:
            body = {
                "refresh_token": provider.issue_refresh_token(user),
                "access_token": access_token,
                "expires_in": 3600,
            }
            status, _ = await call(http, pair, a, "PUT", path("grants", user), json=body)
            assert status in (200, 201)

        async def b_serves(access_token: str | None) -> bool:
            status, body = await call(http, pair, b, "GET", path("tokens", user))
            if access_token is None:
                return status == 404
            return status == 200 and body["access_token"] == access_token

        await put("at-1")
        assert await b_serves("at-1")
        assert await b_serves("at-1")
        hits = await scrape(http, b, "broker_grant_cache_lookups_total", result="hit")
        assert hits >= 1, "replica b does not cache: this test would prove nothing"

        await put("at-2")  # replaced through replica a (a fenced write)
        await eventually(lambda: b_serves("at-2"), "a replaced grant on b", within=PROPAGATION)

        # refreshed through replica a: the rotated tokens reach b too
        status, fresh = await call(
            http, pair, a, "POST", path("tokens", user) + "/refresh",
            json={"rejected_token": "at-2"},
        )  # fmt: skip
        assert status == 200
        assert fresh["access_token"] != "at-2"
        await eventually(
            lambda: b_serves(fresh["access_token"]), "a refresh on b", within=PROPAGATION
        )

        status, _ = await call(http, pair, a, "DELETE", path("grants", user))
        assert status == 204
        await eventually(lambda: b_serves(None), "a deleted grant on b", within=PROPAGATION)
    assert provider.reused_refresh_tokens == 0


async def test_a_lost_subscription_empties_the_cache(
    pair: Fleet, provider: DevProvider, own_redis: RedisServer
) -> None:
    """A change nobody published (here: a hand edit in Redis) is served until the cache's age
    limit; a subscription lost and made again drops every cached grant, since what was
    published in between went unheard."""
    _, b = pair.replicas
    user = "hand-edited"
    grant_key = Keys("fleet").grant_key("dev", user)
    body = {
        "refresh_token": provider.issue_refresh_token(user),
        "access_token": "at-x",
        "expires_in": 3600,
    }
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        async with aiohttp.ClientSession() as http:
            status, _ = await call(http, pair, b, "PUT", path("grants", user), json=body)
            assert status == 201

            async def cached() -> bool:
                before = await scrape(http, b, "broker_grant_cache_lookups_total", result="hit")
                assert (await call(http, pair, b, "GET", path("tokens", user)))[0] == 200
                hits = await scrape(http, b, "broker_grant_cache_lookups_total", result="hit")
                return hits > before

            await eventually(cached, "b serving the grant from its cache", within=5)
            await redis.delete(grant_key)
            # Unpublished: b still answers from its cache (what the age limit bounds).
            assert (await call(http, pair, b, "GET", path("tokens", user)))[0] == 200

            resets = await scrape(http, b, "broker_grant_cache_resets_total")
            assert await redis.client_kill_filter(_type="pubsub") >= 2  # both replicas' listeners

            async def resubscribed() -> bool:
                # lost (connection callback), then confirmed again: two resets
                return await scrape(http, b, "broker_grant_cache_resets_total") >= resets + 2

            await eventually(resubscribed, "b subscribing again", within=5)
            assert (await call(http, pair, b, "GET", path("tokens", user)))[0] == 404
    finally:
        await redis.aclose()


async def test_a_grant_in_steady_demand_is_always_answered_from_the_cache(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """Asked for every 50 ms for longer than the cache keeps an entry: the entry is read again
    in the background before it expires, so no request waits for Redis after the first; a
    change nobody published (a hand delete) still shows within the cache's age limit."""
    max_age = 4.0
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, token_cache_seconds=max_age
    )
    body = {"refresh_token": provider.issue_refresh_token("u"), "access_token": "at-u"}
    assert (await broker.import_grant("u", expires_in=3600, **body))[0] == 201

    def lookups(result: str) -> float:
        return metric(broker, "broker_grant_cache_lookups_total", result=result)

    async def served_from_cache() -> bool:
        hits = lookups("hit")
        return (await broker.token("u"))[0] == 200 and lookups("hit") > hits

    await eventually(served_from_cache, "the grant served from the cache", within=5)
    misses, hits = lookups("miss"), lookups("hit")
    reads = await reads_of(broker)
    deadline = time.monotonic() + max_age * 1.25
    while time.monotonic() < deadline:
        assert (await broker.token("u"))[0] == 200
        await asyncio.sleep(0.05)
    assert lookups("miss") == misses
    assert lookups("hit") > hits + max_age * 10
    assert await reads_of(broker) > reads  # read again, by nobody's request

    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        await redis.delete(Keys(key_prefix).grant_key("dev", "u"))  # unpublished
    finally:
        await redis.aclose()
    deleted_at = time.monotonic()

    async def gone() -> bool:
        return (await broker.token("u"))[0] == 404

    await eventually(gone, "the hand-deleted grant gone", within=max_age + 1)
    assert time.monotonic() - deleted_at <= max_age + 1


async def reads_of(broker: Broker) -> int:
    """HMGETs the broker's Redis server has answered (all clients: compare, don't count)."""
    info = await broker.app[STORE].redis.info("commandstats")
    return int(info.get("cmdstat_hmget", {}).get("calls", 0))


async def test_a_listener_whose_connection_goes_silent_subscribes_on_a_new_one(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """A connection that stops answering without a reset: copies stop being served, and the
    listener drops it and subscribes on a new one instead of waiting a quarter of an hour for
    the kernel to give up on it, so the cache comes back."""
    async with await TcpProxy.start("127.0.0.1", redis_server.port) as proxy:
        broker = await make_broker(
            redis_url=proxy.url_for_redis(),
            key_prefix=key_prefix,
            token_cache_seconds=60,
            redis_timeout=0.5,
        )
        body = {"refresh_token": provider.issue_refresh_token("u"), "access_token": "at-u"}
        assert (await broker.import_grant("u", expires_in=3600, **body))[0] == 201

        async def served_from_cache() -> bool:
            hits = metric(broker, "broker_grant_cache_lookups_total", result="hit")
            status, _ = await broker.token("u")
            return (
                status == 200
                and metric(broker, "broker_grant_cache_lookups_total", result="hit") > hits
            )

        await eventually(served_from_cache, "the grant served from the cache", within=5)
        resets = metric(broker, "broker_grant_cache_resets_total")
        proxy.silence()

        async def given_up() -> bool:
            return metric(broker, "broker_grant_cache_resets_total") > resets

        await eventually(given_up, "the silent subscription given up", within=DEAF_AFTER + 5)
        await eventually(served_from_cache, "the cache serving again", within=10)
    assert provider.reused_refresh_tokens == 0
