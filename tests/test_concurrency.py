"""One refresh per grant at a time, within a process and across replicas on a real Redis."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from typing import Any

import pytest

from broker.devprovider import DevProvider
from broker.keys import member
from tests.conftest import Broker, BrokerFactory, Clock, RedisServer, encryption_key, lines


def in_flight(broker: Broker) -> float:
    app = broker.app
    from broker.api import METRICS

    value = app[METRICS].registry.get_sample_value("broker_http_requests_in_flight")
    return value or 0.0


async def until(condition: Any, what: str, within: float = 5.0) -> None:
    """Wait for ``condition()`` to hold, checking every 10 ms, failing after ``within`` s."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_fifty_concurrent_requests_share_one_refresh(
    make_broker: BrokerFactory, provider: DevProvider, store_url: dict[str, str]
) -> None:
    broker = await make_broker(**store_url)
    await broker.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    broker.clock.advance(3600)
    provider.reset_counters()
    provider.hold()
    calls = [asyncio.create_task(broker.token("u")) for _ in range(50)]
    await provider.wait_for_token_requests(1)
    await until(lambda: in_flight(broker) == 50, "all 50 requests to be waiting")
    provider.release()
    results = await asyncio.gather(*calls)
    assert {status for status, _ in results} == {200}
    assert len({body["access_token"] for _, body in results}) == 1
    assert provider.refresh_requests == 1
    assert provider.reused_refresh_tokens == 0


@pytest.fixture
async def replicas(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> tuple[Broker, Broker]:
    """Two broker apps sharing one Redis, key prefix, encryption keys and clock."""
    shared: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": key_prefix,
        "encryption_keys": encryption_key(),
        "clock": Clock(),
    }
    return await make_broker(**shared), await make_broker(**shared)


async def test_two_replicas_racing_for_one_grant_refresh_once(
    replicas: tuple[Broker, Broker], provider: DevProvider
) -> None:
    a, b = replicas
    await a.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    a.clock.advance(3600)
    provider.reset_counters()
    provider.hold()
    calls = [asyncio.create_task(r.token("u")) for r in (a, b) for _ in range(10)]
    await provider.wait_for_token_requests(1)
    await until(lambda: in_flight(a) == 10 and in_flight(b) == 10, "both replicas waiting")
    provider.release()
    results = await asyncio.gather(*calls)
    assert {status for status, _ in results} == {200}
    assert len({body["access_token"] for _, body in results}) == 1
    assert provider.refresh_requests == 1
    # Neither replica lost the rotated refresh token: both can refresh again, in turn.
    for replica in (b, a):
        replica.clock.advance(3600)
        status, _ = await replica.token("u")
        assert status == 200
    assert provider.refresh_requests == 3
    assert provider.reused_refresh_tokens == 0


async def test_a_rejection_after_another_writer_rotated_returns_the_newer_grant(
    replicas: tuple[Broker, Broker], provider: DevProvider
) -> None:
    """The provider refuses a refresh token because a newer grant was stored meanwhile (here
    written straight to the store): the newer grant is served, never marked reauth_required."""
    from broker.api import STORE

    a, _ = replicas
    await a.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    a.clock.advance(3600)
    provider.fail_next("invalid_grant")
    provider.hold()
    call = asyncio.create_task(a.token("u"))
    await provider.wait_for_token_requests(provider.token_requests + 1)
    store = a.app[STORE]
    stored = await store.read("dev", "u")
    assert stored is not None
    newer = replace(
        stored,
        refresh_token=provider.issue_refresh_token("u"),
        access_token="at-newer",
        access_expires_at=a.clock() + 3600,
        access_issued_at=a.clock(),
        next_refresh_at=a.clock() + 3000,
        version=stored.version + 1,
    )
    assert await store.write(newer, stored.version)
    provider.release()
    status, body = await call
    assert (status, body["access_token"]) == (200, "at-newer")
    status, grant = await a.grant("u")
    assert grant["state"] == "active"
    schedule = store.keys.schedule_of("dev", member("u"))
    assert await store.redis.zscore(schedule, member("u")) == pytest.approx(a.clock() + 3000, abs=5)
    assert provider.reused_refresh_tokens == 0


async def test_lock_is_renewed_while_its_holder_works(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    from broker.api import STORE
    from broker.locks import GrantLocks, LockStore

    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    locks = GrantLocks(LockStore(broker.app[STORE]), ttl=0.3, wait_timeout=0.1)
    other = LockStore(broker.app[STORE])
    async with locks.holding("dev", "u") as held:
        await asyncio.sleep(1.0)  # over three lock lifetimes
        assert not isinstance(await other.acquire("dev", "u", 1.0), str)  # busy
        assert held.remaining() > 0
    assert isinstance(await other.acquire("dev", "u", 1.0), str)


async def test_a_stale_write_cannot_overwrite_a_newer_record(
    make_broker: BrokerFactory, store_url: dict[str, str]
) -> None:
    from broker.api import STORE
    from broker.models import Grant

    broker = await make_broker(**store_url)
    app = broker.app
    store = app[STORE]
    v1 = Grant(provider="dev", user_id="u", refresh_token="rt-1", version=1)
    assert await store.write(v1, 0)
    assert not await store.write(v1, 0)  # "create" when it exists
    v2 = replace(v1, refresh_token="rt-2", version=2)
    assert await store.write(v2, 1)
    stale = replace(v1, refresh_token="rt-stale", version=2)
    assert not await store.write(stale, 1)
    stored = await store.read("dev", "u")
    assert stored is not None
    assert stored.refresh_token == "rt-2"
    assert stored.version == 2


async def test_a_renewer_stops_even_when_a_redis_call_swallows_its_cancellation(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    """On Python 3.11 a cancellation racing a timeout inside redis-py can be swallowed and come
    back as a Redis error: the renewer must still stop, or it would hold the lock forever."""
    from broker.api import STORE
    from broker.errors import StoreUnavailable
    from broker.locks import GrantLocks, LockStore

    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    locks = GrantLocks(LockStore(broker.app[STORE]), ttl=0.2, wait_timeout=0.1)
    held = await locks.acquire("dev", "u")
    assert held is not None
    renewing = asyncio.Event()

    async def swallowing_renew(_: object) -> bool:
        renewing.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise StoreUnavailable("Redis lock failed: TimeoutError") from None
        return True

    locks.renew = swallowing_renew  # type: ignore[method-assign,assignment]
    renewal = locks.renewing(held)
    await asyncio.wait_for(renewing.wait(), 2)
    await asyncio.wait_for(renewal.stop(), 1)
    assert not renewal.active  # no renewal under way, none armed


async def test_a_renewal_refused_once_the_write_released_the_lock_is_no_warning(
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
    log_stream: io.StringIO,
) -> None:
    """A renewal that races the write releasing the lock (a refresh held past a quarter of
    ``lock_ttl``) finds the lock gone: logged at info. Anywhere else a lock found gone is a
    real loss (a stalled holder): a warning."""
    from broker.api import STORE
    from broker.locks import GrantLocks, LockStore

    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    store = broker.app[STORE]
    locks = GrantLocks(LockStore(store), ttl=5.0, wait_timeout=0.1)
    stalled = await locks.acquire("dev", "stalled")
    writing = await locks.acquire("dev", "writing")
    assert stalled is not None
    assert writing is not None
    writing.stage = "write"
    await store.redis.delete(
        store.keys.lock_key("dev", "stalled"), store.keys.lock_key("dev", "writing")
    )
    assert not await locks.renew(stalled)
    assert not await locks.renew(writing)
    assert stalled.lost
    assert writing.lost
    lost = [line for line in lines(log_stream) if line["event"] == "lock.lost"]
    levels = {(line["user_id"], line["level"]) for line in lost}
    assert levels == {("stalled", "warning"), ("writing", "info")}
