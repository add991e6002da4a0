"""The background refresher against a real Redis and the provider, in one process (fast)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from broker.api import METRICS, PROVIDERS, SCHEDULER, STORE
from broker.devprovider import DevProvider
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


async def import_grants(broker: Broker, provider: DevProvider, n: int, expires_in: int) -> None:
    for i in range(n):
        status, _ = await broker.import_grant(
            f"user-{i}",
            refresh_token=provider.issue_refresh_token(f"user-{i}"),
            access_token=f"at-initial-{i}",
            expires_in=expires_in,
        )
        assert status == 201


async def test_grants_are_refreshed_before_they_expire(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    provider.settings.access_token_ttl = 2
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix, **FAST)
    await import_grants(broker, provider, 20, expires_in=2)
    deadline = time.monotonic() + 6  # three lifetimes
    served = 0
    while time.monotonic() < deadline:
        for i in range(20):
            status, token = await broker.token(f"user-{i}", min_ttl=0)
            assert status == 200
            if not token["access_token"].startswith("at-initial"):
                expires = provider.access_token_expires_at(token["access_token"])
                assert expires is not None
                assert expires > time.time()
            served += 1
        await asyncio.sleep(0.1)
    assert served > 100
    for i in range(20):
        assert (await broker.grant(f"user-{i}"))[1]["refresh_count"] >= 2
    # The scheduler kept up: no caller ever had to wait for an on-demand refresh.
    assert (
        metric(
            broker, "broker_refreshes_total", provider="dev", outcome="success", trigger="on_demand"
        )
        == 0
    )
    assert provider.reused_refresh_tokens == 0


async def test_two_replicas_share_the_work_without_spending_a_token_twice(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    provider.settings.access_token_ttl = 2
    shared: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": key_prefix,
        "encryption_keys": encryption_key(),
        "clock": Clock(),
        **FAST,
    }
    a, b = await make_broker(**shared), await make_broker(**shared)
    await import_grants(a, provider, 40, expires_in=2)

    async def refreshed_enough() -> bool:
        counts = [(await a.grant(f"user-{i}"))[1]["refresh_count"] for i in range(40)]
        return all(count >= 2 for count in counts)

    await eventually(refreshed_enough, "every grant refreshed twice", within=15)
    done = [
        metric(r, "broker_refreshes_total", provider="dev", outcome="success", trigger="scheduled")
        for r in (a, b)
    ]
    assert all(n > 0 for n in done), done  # both replicas took a share
    assert provider.reused_refresh_tokens == 0


async def test_failing_provider_gets_backoff_and_grants_recover(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(  # the circuit stays out of this: backoff alone
        redis_url=redis_server.url, key_prefix=key_prefix, circuit_failures=1000, **FAST
    )
    await import_grants(broker, provider, 10, expires_in=60)
    provider.fail_always("server_error")
    provider.reset_counters()
    broker.clock.advance(58)  # every grant is due now; their tokens still have 2 s

    status, token = await broker.token("user-0", min_ttl=0)
    assert status == 200  # still valid: served while the provider is down
    assert token["access_token"] == "at-initial-0"

    async def failing_for_a_while() -> bool:
        grants = [(await broker.grant(f"user-{i}"))[1] for i in range(10)]
        return all(
            g["state"] == "refresh_failing" and g["consecutive_failures"] >= 5 for g in grants
        )

    await eventually(failing_for_a_while, "grants to fail five times", within=20)
    started = time.monotonic()
    before = provider.token_requests
    await asyncio.sleep(2.0)  # a window to count retries in
    rate = (provider.token_requests - before) / (time.monotonic() - started)
    # Without backoff: 10 grants x 20 ticks a second = 200/s. With it, each grant waits up to
    # 3.2 s (0.2 s doubled four times): about 6/s.
    assert rate < 15, f"{rate:.1f} requests/s against a failing provider"

    provider.heal()

    async def all_active() -> bool:
        states = [(await broker.grant(f"user-{i}"))[1]["state"] for i in range(10)]
        return set(states) == {"active"}

    await eventually(all_active, "grants to recover", within=15)
    for i in range(10):
        status, token = await broker.token(f"user-{i}", min_ttl=0)
        assert status == 200
        assert token["access_token"] != f"at-initial-{i}"
    assert provider.reused_refresh_tokens == 0


async def test_circuit_opens_on_a_failing_provider_and_probes_it(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        circuit_failures=3,
        circuit_open_for=0.5,
        **FAST,
    )
    await import_grants(broker, provider, 10, expires_in=60)
    provider.fail_always("rate_limited", retry_after=0)
    broker.clock.advance(59)

    async def circuit_open() -> bool:
        return metric(broker, "broker_provider_circuit_state", provider="dev") == 2.0 or (
            broker.app[PROVIDERS].breaker("dev").state == "open"
        )

    await eventually(circuit_open, "the circuit to open", within=10)
    before, started = provider.token_requests, time.monotonic()
    await asyncio.sleep(2.0)
    probes = provider.token_requests - before
    # One probe per open period, plus calls that were already past the breaker when it
    # opened (at most provider_concurrency, 8). Without the circuit, retries alone would send
    # 40 to 60 requests in this window.
    assert probes <= (time.monotonic() - started) / 0.5 + 1 + 8, probes
    provider.heal()

    async def all_fresh() -> bool:
        answers = [await broker.token(f"user-{i}", min_ttl=0) for i in range(10)]
        return all(
            status == 200 and not body["access_token"].startswith("at-initial")
            for status, body in answers
        )

    await eventually(all_fresh, "every grant refreshed after the provider healed", within=10)
    assert broker.app[PROVIDERS].breaker("dev").state == "closed"


async def test_rejected_grants_leave_the_schedule(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix, **FAST)
    await broker.import_grant("dead", refresh_token="rt-unknown", access_token="at", expires_in=60)
    broker.clock.advance(59)

    async def reauth() -> bool:
        _, grant = await broker.grant("dead")
        return bool(grant["state"] == "reauth_required")

    await eventually(reauth, "the grant to need re-authorization", within=10)
    store = broker.app[STORE]

    async def unscheduled() -> bool:  # the index is updated right after the record's write
        return bool(await store.redis.zcard(store.keys.schedule_key("dev")) == 0)

    await eventually(unscheduled, "the grant to leave the schedule", within=5)
    requests = provider.token_requests
    broker.clock.advance(3600)
    scheduler = broker.app[SCHEDULER]
    looked = scheduler.ticks + 10

    async def ten_ticks() -> bool:
        return scheduler.ticks >= looked

    await eventually(ten_ticks, "ten more scheduler ticks", within=5)
    assert provider.token_requests == requests  # none of them claimed the dead grant


async def test_a_stale_schedule_entry_for_a_dead_grant_is_dropped(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix, **FAST)
    store = broker.app[STORE]
    await store.redis.zadd(store.keys.schedule_key("dev"), {"Z29uZQ": 0})  # "gone": no such grant

    async def dropped() -> bool:
        return await store.redis.zscore(store.keys.schedule_key("dev"), "Z29uZQ") is None

    await eventually(dropped, "the stale entry to be dropped", within=5)


async def test_stopping_hands_unfinished_claims_back(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, shutdown_timeout=0.2, **FAST
    )
    await import_grants(broker, provider, 1, expires_in=60)
    provider.hold()
    broker.clock.advance(59)
    await provider.wait_for_token_requests(1)
    store = broker.app[STORE]
    await broker.client.close()  # stop: the refresh is stuck at the provider past the drain
    score = await store.redis.zscore(store.keys.schedule_key("dev"), "dXNlci0w")
    provider.release()
    assert score is not None
    assert score <= broker.clock() + 0.5  # due again now, not after the lease


async def test_redis_restart_does_not_stop_the_refresher(
    make_broker: BrokerFactory,
    provider: DevProvider,
    own_redis: RedisServer,
) -> None:
    own_redis.args += ["--appendonly", "yes", "--appendfsync", "always"]
    own_redis.stop()
    own_redis.start()
    provider.settings.access_token_ttl = 2
    broker = await make_broker(redis_url=own_redis.url, **FAST)
    await import_grants(broker, provider, 5, expires_in=2)
    own_redis.stop()
    errors = metric(broker, "broker_redis_errors_total", operation="claim")

    async def met_the_outage() -> bool:  # the scheduler did try a dead Redis, more than once
        return metric(broker, "broker_redis_errors_total", operation="claim") >= errors + 2

    await eventually(met_the_outage, "the scheduler to meet the dead Redis", within=10)
    own_redis.start()
    counts_then = [(await broker.grant(f"user-{i}"))[1]["refresh_count"] for i in range(5)]

    async def resumed() -> bool:
        counts = [(await broker.grant(f"user-{i}"))[1]["refresh_count"] for i in range(5)]
        return all(now >= then + 2 for now, then in zip(counts, counts_then, strict=True))

    await eventually(resumed, "refreshes to resume after the restart", within=15)
    assert provider.reused_refresh_tokens == 0


async def test_refresh_tokens_near_their_maximum_age_are_surfaced(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        refresh_token_warn_before=3600,
        provider={"refresh_token_max_age": 7 * 86400},
        **FAST,
    )
    provider.settings.rotate_refresh_tokens = False  # the refresh token only ages
    await broker.import_grant("old", refresh_token=provider.issue_refresh_token("old"))
    _, grant = await broker.grant("old")
    assert grant["refresh_token_expires_at"] is not None  # 7 days after it was issued
    assert metric(broker, "broker_refresh_tokens_expiring", provider="dev") == 0
    broker.clock.advance(7 * 86400 - 1800)  # half an hour before the provider's maximum age
    broker.app[METRICS].refresh_token_expiring.labels("dev").set(-1)  # see it recomputed

    async def surfaced() -> bool:
        return metric(broker, "broker_refresh_tokens_expiring", provider="dev") == 1

    await eventually(surfaced, "the expiring refresh token to be counted", within=10)

    async def ready_and_on_time() -> bool:  # the overdue grant refreshed: nothing is late
        status, ready, _ = await broker.call("GET", "/readyz")
        scheduler = ready["checks"]["scheduler"]
        assert set(scheduler) == {"ok", "lag_seconds"}
        return bool(status == 200 and scheduler["ok"] is True and scheduler["lag_seconds"] < 5)

    await eventually(ready_and_on_time, "readiness with a scheduler on time", within=10)


async def test_a_claim_is_renewed_while_its_refresh_runs_and_left_alone_once_stopped(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    """A refresh longer than its lease keeps the claim (no other replica takes the grant
    meanwhile); a write that rescheduled the grant ends the renewals; a stopped keeper moves
    nothing any more."""
    from broker.claimed import LeaseKeeper
    from broker.keys import member

    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    schedule = broker.app[STORE].schedule
    key, m = schedule.keys.schedule_of("dev", member("u")), member("u")
    redis = broker.app[STORE].redis
    lease = time.time() + 0.3
    await redis.zadd(key, {m: lease})
    keeper = LeaseKeeper(schedule, "dev", "u", lease, 0.3, time.time)

    async def renewed_twice() -> bool:
        score = await redis.zscore(key, m)
        return bool(score is not None and score > lease + 0.15 and keeper.score == score)

    await eventually(renewed_twice, "the lease to be renewed", within=5)
    assert (await redis.zscore(key, m) or 0.0) > time.time()  # never let lapse meanwhile
    await redis.zadd(key, {m: 12345.0})  # a write rescheduled it: that write wins
    await asyncio.sleep(0.3)  # a renewal falls due within it
    assert await redis.zscore(key, m) == 12345.0
    held = await keeper.stop()
    assert held == keeper.score

    stopped = LeaseKeeper(schedule, "dev", "u", 12345.0, 0.3, time.time)
    assert await stopped.stop() == 12345.0
    await asyncio.sleep(0.3)  # when its first renewal would have been due
    assert await redis.zscore(key, m) == 12345.0
