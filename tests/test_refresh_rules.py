"""The refresh-safety rules, each against a real redis-server and the strict dev provider:
fences that never repeat, idempotent writes under lost replies, rotated tokens kept through a
Redis stall, waiting callers that never starve, min_ttl as the contract says, status that tells
the truth while a provider is down, prompt recovery, and a reconciler for lost index updates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis as syncredis

from broker.api import METRICS, PROVIDERS, REFRESHER, STORE
from broker.devprovider import DevProvider
from broker.keys import member
from broker.locks import LockStore
from broker.store import GrantStore
from tests.conftest import FAST_SCHEDULER as FAST
from tests.conftest import Broker, BrokerFactory, RedisServer, encryption_key, eventually, metric
from tests.faults import TcpProxy
from tests.test_scheduler import import_grants


async def test_a_grant_deleted_and_imported_again_never_repeats_a_version(
    broker: Broker, provider: DevProvider
) -> None:
    """A writer that read the first incarnation of a grant holds its version as a fence; the
    grant imported again after a delete must not accept that writer's write."""
    store = broker.app[STORE]
    await broker.import_grant("u", refresh_token="rt-1", access_token="at-1", expires_in=600)
    first = await store.read("dev", "u")
    assert first is not None
    stale = replace(first, access_token="at-stale", version=first.version + 1)
    assert (await broker.call("DELETE", "/v1/grants/dev/u"))[0] == 204
    await broker.import_grant("u", refresh_token="rt-2", access_token="at-2", expires_in=600)
    assert not await store.write(stale, first.version)
    assert (await broker.token("u"))[1]["access_token"] == "at-2"


@pytest.mark.parametrize("script", ["grant write", "lock"])
async def test_a_write_whose_reply_was_lost_recognises_itself(
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
    script: str,
) -> None:
    """redis-py sends a command again when its reply is lost: the second run must see that the
    first one already did the work (no false conflict, no 503, no lock held by nobody)."""
    async with await TcpProxy.start("127.0.0.1", redis_server.port) as proxy:
        broker = await make_broker(redis_url=proxy.url_for_redis(), key_prefix=key_prefix)
        store = broker.app[STORE]
        locks = LockStore(store)
        sha = store._fenced_write.sha if script == "grant write" else locks._acquire.sha
        proxy.drop_reply_once(sha.encode())
        status, grant = await broker.import_grant(
            "u", refresh_token=provider.issue_refresh_token("u")
        )
        assert proxy.dropped_replies == 1
        assert status == 201, grant
        assert await store.redis.zscore(store.keys.schedule_key("dev"), member("u")) is not None
        # and the refresh path (whose lock script reads the grant too): a rotated token stored
        # once, no conflict counted
        broker.clock.advance(3600)
        if script == "lock":
            sha = locks._acquire_read.sha
        proxy.drop_reply_once(sha.encode())
        assert (await broker.token("u"))[0] == 200
        assert proxy.dropped_replies == 2
        assert metric(broker, "broker_refresh_write_conflicts_total", provider="dev") == 0
        broker.clock.advance(3600)  # the stored refresh token is the live one
        assert (await broker.token("u"))[0] == 200
        assert provider.reused_refresh_tokens == 0


async def test_a_refresh_write_releases_the_lock_only_when_it_lands(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """The write of a refresh's result releases the lock in the same step (one round trip
    fewer), but only a write that landed and only the writer's own lock: a lock that goes
    without the rotated token stored would let another replica present the spent one."""
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    await broker.import_grant("u", refresh_token="rt-1", access_token="at-1", expires_in=600)
    store = broker.app[STORE]
    lock_key = store.keys.lock_key("dev", "u")
    token = await LockStore(store).acquire("dev", "u", 30)
    assert isinstance(token, str)
    read = await store.read("dev", "u")
    assert read is not None
    new = replace(read, access_token="at-2", version=read.version + 1)

    assert not await store.write(new, read.version - 1, lock_token=token)  # fenced out
    assert await store.redis.get(lock_key) == token.encode()
    assert await store.write(new, read.version, lock_token="another-holder")
    assert await store.redis.get(lock_key) == token.encode()
    newer = replace(new, access_token="at-3", version=new.version + 1)
    assert await store.write(newer, new.version, lock_token=token)
    assert await store.redis.get(lock_key) is None
    assert (await broker.token("u"))[1]["access_token"] == "at-3"
    assert provider.reused_refresh_tokens == 0


async def test_with_replica_acks_the_lock_outlives_the_write(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    """With ``min_replicas_to_ack`` the holder releases the lock after WAIT confirmed the
    write, never in the write's own step (a failover in between could lose the write but not
    the release)."""
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, min_replicas_to_ack=1,
        replica_ack_timeout=0.05,
    )  # fmt: skip
    await broker.import_grant("u", refresh_token="rt-1", access_token="at-1", expires_in=600)
    store = broker.app[STORE]
    assert not store.unlocks_on_write
    token = await LockStore(store).acquire("dev", "u", 30)
    assert isinstance(token, str)
    read = await store.read("dev", "u")
    assert read is not None
    written = replace(read, version=read.version + 1)
    assert await store.write(written, read.version, lock_token=token)
    assert await store.redis.get(store.keys.lock_key("dev", "u")) == token.encode()


async def test_a_redis_stall_mid_refresh_keeps_the_rotated_token_and_answers_at_once(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """Writes stall (CLIENT PAUSE WRITE) right after the provider rotated the refresh token: the
    caller gets the new access token without waiting for Redis, and the write lands later."""
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix, redis_timeout=0.3)
    await broker.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    broker.clock.advance(3600)
    provider.hold()
    call = asyncio.create_task(broker.token("u"))
    await provider.wait_for_token_requests(provider.token_requests + 1)
    admin = syncredis.Redis.from_url(redis_server.url)
    pause = 4.0
    admin.execute_command("CLIENT", "PAUSE", int(pause * 1000), "WRITE")  # type: ignore[no-untyped-call]
    paused_at = time.monotonic()
    try:
        provider.release()
        status, token = await call
        answered_after = time.monotonic() - paused_at
        assert status == 200
        assert answered_after < pause - 1, answered_after  # not held until Redis came back
        assert provider.access_token_expires_at(token["access_token"]) is not None
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]

    async def stored() -> bool:
        return bool((await broker.grant("u"))[1]["refresh_count"] == 2)

    await eventually(stored, "the rotated tokens to be written", within=10)
    assert metric(broker, "broker_rotated_writes_lost_total", provider="dev") == 0
    broker.clock.advance(3600)
    assert (await broker.token("u"))[0] == 200
    assert provider.reused_refresh_tokens == 0


async def test_a_caller_arriving_after_an_early_answer_expired_gets_a_fresh_token(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """A refresh answered early (its write stalled) stays in flight until the write lands. A
    caller arriving once that early answer has expired must not be handed it (an expired token,
    503): it waits for the write, then refreshes with the rotated token, which is presented
    once."""
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix, redis_timeout=0.3)
    await broker.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    broker.clock.advance(3600)
    admin = syncredis.Redis.from_url(redis_server.url)
    provider.hold()
    first = asyncio.create_task(broker.token("u"))
    await provider.wait_for_token_requests(provider.token_requests + 1)
    admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")  # type: ignore[no-untyped-call]
    try:
        provider.release()
        assert (await first)[0] == 200  # answered early: the rotated tokens' write waits
        assert broker.app[REFRESHER].in_flight("dev", "u")
        broker.clock.advance(3600)  # the early answer has expired
        requests = provider.token_requests
        second = asyncio.create_task(broker.token("u"))
        await asyncio.sleep(0.5)
        assert not second.done()  # waiting for the first flight's write, not answered stale
        assert provider.token_requests == requests
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
    status, token = await second
    assert status == 200, token
    assert provider.access_token_expires_at(token["access_token"]) is not None
    assert (await broker.grant("u"))[1]["refresh_count"] == 3
    assert provider.reused_refresh_tokens == 0


async def test_a_waiting_caller_returns_as_soon_as_a_fresh_token_is_stored(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """The lock stays busy (other replicas keep refreshing), but a fresh token was stored: the
    caller must get it then, not when it finally wins the lock."""
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    await broker.import_grant("u", refresh_token="rt", access_token="at-old", expires_in=10)
    store = broker.app[STORE]
    other = await LockStore(store).acquire("dev", "u", 30)  # another replica's refresh
    assert isinstance(other, str)
    reads = await reads_of(store)
    call = asyncio.create_task(broker.token("u", min_ttl=60))
    await until_reads(store, reads + 3)  # it is polling: lock busy, grant re-read
    assert not call.done()  # waiting for the holder
    current = await store.read("dev", "u")
    assert current is not None
    fresh = replace(
        current,
        access_token="at-fresh",
        access_expires_at=broker.clock() + 3600,
        version=current.version + 1,
    )
    assert await store.write(fresh, current.version)
    written_at = time.monotonic()
    status, token = await call
    assert (status, token["access_token"]) == (200, "at-fresh")
    assert time.monotonic() - written_at < 1.0
    assert await store.redis.get(store.keys.lock_key("dev", "u")) == other.encode()  # still busy


async def test_a_waiting_caller_gets_the_holders_failure_without_waiting_it_out(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """The holder's refresh failed and left the token expired: the waiting caller answers 503 at
    once instead of waiting out lock_wait_timeout to fail the same way."""
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    await broker.import_grant("u", refresh_token="rt", access_token="at-old", expires_in=10)
    broker.clock.advance(20)  # expired
    store = broker.app[STORE]
    other = await LockStore(store).acquire("dev", "u", 30)  # another replica's refresh
    assert isinstance(other, str)
    reads = await reads_of(store)
    call = asyncio.create_task(broker.token("u"))
    await until_reads(store, reads + 3)
    current = await store.read("dev", "u")
    assert current is not None
    failed = current.with_failure(
        "http_500", broker.clock(), final=False, failing_after=3, retry_at=broker.clock() + 5
    )
    assert await store.write(failed, current.version)
    written_at = time.monotonic()
    status, body = await call
    assert (status, body["code"]) == (503, "upstream_unavailable")
    assert time.monotonic() - written_at < 1.0  # not lock_wait_timeout (20 s)
    assert provider.refresh_requests == 0


async def test_min_ttl_is_met_whenever_the_providers_lifetime_allows_it(
    broker: Broker, provider: DevProvider
) -> None:
    provider.settings.access_token_ttl = 600
    await broker.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    assert provider.refresh_requests == 1
    broker.clock.advance(250)  # 350 s left
    status, token = await broker.token("u", min_ttl=400)
    assert status == 200
    assert token["expires_in"] >= 400  # refreshed: 400 <= 600, the provider allows it
    assert provider.refresh_requests == 2
    broker.clock.advance(250)  # 350 s left; 900 > 600 is capped at half the lifetime
    status, token = await broker.token("u", min_ttl=900)
    assert (status, provider.refresh_requests) == (200, 2)
    assert token["expires_in"] >= 300
    broker.clock.advance(100)  # 250 s left: below half the lifetime
    status, token = await broker.token("u", min_ttl=900)
    assert (status, provider.refresh_requests) == (200, 3)
    assert token["expires_in"] >= 599
    assert provider.reused_refresh_tokens == 0


async def test_a_caller_joining_a_refresh_for_a_smaller_min_ttl_gets_its_own(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    provider.settings.access_token_ttl = 600
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    await broker.import_grant(
        "u", refresh_token=provider.issue_refresh_token("u"), access_token="at-0", expires_in=20
    )
    store = broker.app[STORE]
    held = await LockStore(store).acquire("dev", "u", 30)
    assert isinstance(held, str)
    refresher = broker.app[REFRESHER]
    small = asyncio.create_task(broker.token("u", min_ttl=30))  # starts the shared refresh
    await until_true(lambda: refresher.in_flight("dev", "u"), "the shared refresh to start")
    large = asyncio.create_task(broker.token("u", min_ttl=500))  # joins it
    await until_true(lambda: in_flight_requests(broker) == 2, "both callers to wait")
    current = await store.read("dev", "u")
    assert current is not None
    somewhat = replace(
        current,
        access_token="at-100",
        access_expires_at=broker.clock() + 100,
        version=current.version + 1,
    )
    assert await store.write(somewhat, current.version)  # enough for 30, not for 500
    assert (await small)[1]["access_token"] == "at-100"
    await LockStore(store).release("dev", "u", held)
    status, token = await large
    assert status == 200
    assert token["expires_in"] >= 500
    assert provider.reused_refresh_tokens == 0


async def reads_of(store: GrantStore) -> int:
    """Commands Redis has run for grant reads (HMGET), from its own statistics."""
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def until_reads(store: GrantStore, n: int) -> None:
    deadline = time.monotonic() + 5
    while await reads_of(store) < n:
        assert time.monotonic() < deadline, "the waiting caller never re-read the grant"
        await asyncio.sleep(0.01)


async def until_true(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def in_flight_requests(broker: Broker) -> float:
    value = broker.app[METRICS].registry.get_sample_value("broker_http_requests_in_flight")
    return value or 0.0


OUTAGE = {
    **FAST,
    "circuit_failures": 3,
    "circuit_open_for": 1.0,
    "retry_base": 5.0,  # long backoffs: recovery must not wait for them
    "retry_max": 60.0,
}


async def test_a_provider_outage_shows_refresh_failing_and_recovery_is_prompt(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    grants = 12
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix, **OUTAGE)
    provider.settings.access_token_ttl = 3
    await import_grants(broker, provider, grants, expires_in=3)
    provider.fail_always("server_error")
    outage_started = time.monotonic()

    async def all_failing() -> bool:
        statuses = [(await broker.grant(f"user-{i}"))[1] for i in range(grants)]
        return all(s["state"] == "refresh_failing" and s["last_error"] for s in statuses)

    # tokens expire 3 s after import; each grant shows it a few seconds later at most
    await eventually(all_failing, "every expired grant to show refresh_failing", within=10)
    assert time.monotonic() - outage_started < 3 + 4
    assert broker.app[PROVIDERS].breaker("dev").state != "closed"

    async def metric_agrees() -> bool:
        return metric(broker, "broker_grants", provider="dev", state="refresh_failing") == grants

    await eventually(metric_agrees, "broker_grants{state=refresh_failing} to agree", within=7)
    status, body = await broker.token("user-0", min_ttl=0)
    assert (status, body["code"]) == (503, "upstream_unavailable")

    before, quiet_from = provider.token_requests, time.monotonic()
    await asyncio.sleep(3.0)
    during = provider.token_requests - before
    assert during <= (time.monotonic() - quiet_from) / 1.0 + 2, during  # about one probe a second

    provider.heal()
    healed_at = time.monotonic()

    async def all_active() -> bool:
        statuses = [(await broker.grant(f"user-{i}"))[1] for i in range(grants)]
        return {s["state"] for s in statuses} == {"active"}

    await eventually(all_active, "every grant to recover", within=10)
    recovery = time.monotonic() - healed_at
    assert recovery < 4.0, recovery  # a probe within a second, then all at once
    for i in range(grants):
        status, token = await broker.token(f"user-{i}", min_ttl=0)
        assert status == 200
        assert provider.access_token_expires_at(token["access_token"]) is not None
    assert provider.reused_refresh_tokens == 0


async def test_a_grant_lost_from_the_indexes_is_found_and_scheduled_again(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    provider.settings.access_token_ttl = 2
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, reconcile_interval=0.05, **FAST
    )
    await import_grants(broker, provider, 5, expires_in=30)
    store = broker.app[STORE]
    lost = member("user-3")
    # what a lost index update leaves behind: off the schedule, in a wrong state set
    await store.redis.zrem(store.keys.schedule_key("dev"), lost)
    await store.redis.sadd(store.keys.state_key("dev", "reauth_required"), lost)

    async def repaired() -> bool:
        scheduled = await store.redis.zscore(store.keys.schedule_key("dev"), lost)
        wrong = await store.redis.sismember(store.keys.state_key("dev", "reauth_required"), lost)
        return scheduled is not None and not wrong

    await eventually(repaired, "the reconciler to put the grant back", within=5)
    labels = {"provider": "dev"}
    assert metric(broker, "broker_index_repairs_total", index="schedule", **labels) == 1
    assert metric(broker, "broker_index_repairs_total", index="reauth_required", **labels) == 1
    broker.clock.advance(30)  # due: the scheduler refreshes it like the others

    async def refreshed() -> bool:
        return bool((await broker.grant("user-3"))[1]["refresh_count"] >= 1)

    await eventually(refreshed, "the repaired grant to be refreshed", within=5)
    assert provider.reused_refresh_tokens == 0


async def test_a_lost_grant_of_an_old_record_format_is_scheduled_again(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """A record written before records carried ``due`` and ``st`` in clear: the reconciler
    decrypts it to learn where it belongs."""
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, reconcile_interval=0.05, **FAST
    )
    await import_grants(broker, provider, 3, expires_in=600)  # none comes due meanwhile
    store = broker.app[STORE]
    lost = member("user-1")
    await store.redis.hdel(store.keys.grant_key("dev", "user-1"), "due", "st")
    await store.redis.zrem(store.keys.schedule_key("dev"), lost)

    async def repaired() -> bool:
        return await store.redis.zscore(store.keys.schedule_key("dev"), lost) is not None

    await eventually(repaired, "the reconciler to schedule the old record", within=5)
    assert metric(broker, "broker_index_repairs_total", provider="dev", index="schedule") == 1


async def test_a_lost_refresh_token_expiry_entry_is_put_back(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """The index behind ``broker_refresh_tokens_expiring`` and the expiry warnings: an entry a
    lost update left out is put back, a stale one taken out."""
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        reconcile_interval=0.05,
        provider={"refresh_token_max_age": 7 * 86400},
        **FAST,
    )
    await import_grants(broker, provider, 2, expires_in=600)
    store = broker.app[STORE]
    expiry = store.keys.rt_expiry_key("dev")
    lost, stale = member("user-0"), member("user-1")
    await store.redis.zrem(expiry, lost)
    # user-1 ends up in reauth_required: its entry must go (as if that index update was lost)
    await store.redis.hset(store.keys.grant_key("dev", "user-1"), "st", "reauth_required")

    async def repaired() -> bool:
        back = await store.redis.zscore(expiry, lost) is not None
        return back and await store.redis.zscore(expiry, stale) is None

    await eventually(repaired, "the reconciler to mend the expiry index", within=5)
    labels = {"provider": "dev", "index": "refresh_token_expiry"}
    assert metric(broker, "broker_index_repairs_total", **labels) == 2


async def test_a_write_updates_its_indexes_in_its_own_step_as_the_cluster_path_would(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    """Off a Redis Cluster the write script updates the grant's schedule, state and expiry
    entries itself (nothing to lose between the write and its indexes); the entries are those
    the Cluster path's ``ScheduleIndex.index`` writes, for every kind of grant; a write that
    does not land touches none."""
    from broker.models import Grant

    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    store: GrantStore = broker.app[STORE]
    keys, redis = store.keys, store.redis

    async def entries(user_id: str) -> tuple[object, ...]:
        m = member(user_id)
        return (
            await redis.zscore(keys.schedule_of("dev", m), m),
            await redis.sismember(keys.state_key("dev", "refresh_failing"), m),
            await redis.sismember(keys.state_key("dev", "reauth_required"), m),
            await redis.zscore(keys.rt_expiry_key("dev"), m),
        )

    base = Grant(provider="dev", user_id="", refresh_token="rt", version=1)
    shapes = {
        "active": replace(base, next_refresh_at=1000.5, refresh_token_expires_at=9000.25),
        "failing": replace(base, state="refresh_failing", next_refresh_at=2000.0),
        "reauth": replace(
            base, state="reauth_required", next_refresh_at=3000.0, refresh_token_expires_at=9.0
        ),
        "access_only": replace(base, refresh_token=None, access_token="at"),
    }
    for name, shape in shapes.items():
        assert await store.write(replace(shape, user_id=f"w-{name}"), 0)
        await store.schedule.index(replace(shape, user_id=f"i-{name}"))
        assert await entries(f"w-{name}") == await entries(f"i-{name}"), name
    assert await entries("w-active") == (1000.5, False, False, 9000.25)
    assert await entries("w-failing") == (2000.0, True, False, None)
    assert await entries("w-reauth") == (None, False, True, None)
    assert (await entries("w-access_only"))[0] == float("inf")

    moved = replace(shapes["failing"], user_id="w-active", version=2)
    assert not await store.write(moved, 0)  # a stale version: the fence holds
    assert await entries("w-active") == (1000.5, False, False, 9000.25)
    assert await store.write(moved, 1)
    assert await entries("w-active") == (2000.0, True, False, None)


async def test_a_rotated_write_goes_on_through_an_outage_at_shutdown(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """Shutdown begins while the write of a rotated token is stalled: the drain waits for it
    (within its budget) instead of closing Redis under it."""
    keys = encryption_key()
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        encryption_keys=keys,
        redis_timeout=0.3,
        shutdown_timeout=6,
    )
    await broker.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    broker.clock.advance(3600)
    provider.hold()
    call = asyncio.create_task(broker.token("u"))
    await provider.wait_for_token_requests(provider.token_requests + 1)
    admin = syncredis.Redis.from_url(redis_server.url)
    admin.execute_command("CLIENT", "PAUSE", 2500, "WRITE")  # type: ignore[no-untyped-call]
    provider.release()
    assert (await call)[0] == 200
    await broker.client.close()  # SIGTERM's path: shutdown, then cleanup (the drain)
    successor = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        encryption_keys=keys,
        clock=broker.clock,
    )
    _, grant = await successor.grant("u")
    assert grant["refresh_count"] == 2  # the rotated tokens reached Redis before the exit
    successor.clock.advance(3600)
    assert (await successor.token("u"))[0] == 200
    assert provider.reused_refresh_tokens == 0
