"""The background refresher: claims due grants from Redis and refreshes them before expiry.

Every replica runs one. Each tick it claims, per provider, only as many due grants as it can
start at once (free global slots, free slots for that provider, none while the provider's
circuit is open), so nothing is hoarded: a replica that dies holds a few seconds-long leases at
most, and those grants come due again for the others when the leases end. Leases are renewed
while their refresh runs; the refresh itself goes through the same per-grant lock and fenced
writes as on-demand refreshes, so the two never both spend a rotating refresh token.

While a provider's circuit is open, due grants are still claimed (a bounded number per tick)
but no provider call is made: a grant whose access token has expired is marked
``refresh_failing`` and waits for the next probe; a successful probe makes them due at once.

A tick costs one small script call per provider whatever the number of grants stored: the
claim reads only the due end of a sorted set. Every ``reconcile_interval`` the reconciler also
checks one bounded batch of grants against the indexes (``broker/reconcile.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from broker.circuit import STATE_VALUES
from broker.claimed import ClaimedRefresh
from broker.config import Settings
from broker.errors import (
    BrokerError,
    StoreUnavailable,
)
from broker.metrics import Metrics
from broker.providers import ProviderRegistry
from broker.reconcile import IndexReconciler
from broker.refresh import Refresher
from broker.store import GrantStore

log = structlog.get_logger(__name__)

STATS_INTERVAL = 5.0
STORE_ERROR_PAUSE = 1.0


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    concurrency: int
    provider_concurrency: int
    lease: float
    tick: float
    drain_timeout: float
    rt_warn_before: float
    reconcile_interval: float = 1.0
    reconcile_batch: int = 100

    @classmethod
    def from_settings(cls, s: Settings) -> SchedulerPolicy:
        return cls(
            concurrency=s.scheduler_concurrency,
            provider_concurrency=s.provider_concurrency,
            lease=s.scheduler_lease,
            tick=s.scheduler_tick,
            drain_timeout=s.shutdown_timeout,
            rt_warn_before=s.refresh_token_warn_before,
            reconcile_interval=s.reconcile_interval,
            reconcile_batch=s.reconcile_batch,
        )


class Scheduler:
    def __init__(
        self,
        store: GrantStore,
        refresher: Refresher,
        providers: ProviderRegistry,
        metrics: Metrics,
        policy: SchedulerPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._schedule = store.schedule
        self._refresher = refresher
        self._providers = providers
        self._metrics = metrics
        self._policy = policy
        self._clock = clock
        self._busy: dict[str, int] = dict.fromkeys(providers, 0)
        self._probing: set[str] = set()
        self._work: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._reconciler = IndexReconciler(store, metrics, policy.reconcile_batch)
        self._claimed = ClaimedRefresh(self._schedule, refresher, providers, policy.lease, clock)
        self.lag = 0.0
        self.last_tick = 0.0
        self.ticks = 0  # completed ticks: lets a test wait for the scheduler to have looked

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="broker-scheduler")

    def stop_claiming(self) -> None:
        """The first step of shutdown: no new claims; refreshes in flight go on."""
        self._stopping.set()
        self._wake.set()

    async def stop(self, budget: float | None = None) -> None:
        """Stop claiming; let refreshes in flight finish within ``budget`` (default: the
        drain time), then hand the leases of any unfinished ones back so another replica takes
        them at once. (The refreshes themselves go on: their results must be stored.)"""
        self._stopping.set()
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._work:
            wait = self._policy.drain_timeout if budget is None else max(0.0, budget)
            _, pending = await asyncio.wait(self._work, timeout=wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _limit(self, provider: str) -> int:
        configured = self._providers.get(provider).max_concurrency
        return configured or self._policy.provider_concurrency

    async def _run(self) -> None:
        next_stats = next_reconcile = 0.0
        while not self._stopping.is_set():
            try:
                await self._claim_and_start()
                if time.monotonic() >= next_stats:
                    await self._update_stats()
                    next_stats = time.monotonic() + STATS_INTERVAL
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + self._policy.reconcile_interval
                    await self._reconciler.step()
            except StoreUnavailable:
                log.warning("scheduler.store_unavailable")
                await asyncio.sleep(STORE_ERROR_PAUSE)
            except Exception:
                log.exception("scheduler.tick_failed")
                await asyncio.sleep(STORE_ERROR_PAUSE)
            self.last_tick = time.monotonic()
            self.ticks += 1
            self._wake.clear()
            # The tick as a timer on the event, not ``wait_for``: that is a task per wait, and
            # under load the loop wakes for every finished refresh.
            tick = asyncio.get_running_loop().call_later(self._policy.tick, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                tick.cancel()

    async def _claim_and_start(self) -> None:
        for provider in self._providers:
            free = min(
                self._policy.concurrency - len(self._work),
                self._limit(provider) - self._busy[provider],
            )
            if free <= 0:
                continue
            if self._providers.breaker(provider).state == "half_open":
                if provider in self._probing:
                    continue
                # The probe: a grant left failing by the outage (none may be due for a while
                # after their backoff), else the next due one.
                probe = await self._schedule.failing_sample(provider)
                if probe is not None:
                    self._start(provider, self._probe(provider, probe))
                    continue
                free = 1
            now = self._clock()
            lease = now + self._policy.lease
            for user_id in await self._schedule.claim_due(provider, now, lease, free):
                self._start(provider, self._refresh(provider, user_id, lease))

    def _start(self, provider: str, work: Coroutine[Any, Any, None]) -> None:
        self._busy[provider] += 1
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        self._wake.set()  # a slot is free: claim more now, not at the next tick

    async def _probe(self, provider: str, user_id: str) -> None:
        """Try one failing grant while the circuit is half-open; success closes the circuit
        and makes the others due at once (``broker/recovery.py``)."""
        self._probing.add(provider)
        try:
            await self._refresher.refresh_due(provider, user_id, probe=True)
        except BrokerError as err:
            log.info("scheduler.probe_failed", provider=provider, problem=err.code)
        except Exception:
            log.exception("scheduler.refresh_crashed", provider=provider, user_id=user_id)
        finally:
            self._probing.discard(provider)
            self._busy[provider] -= 1

    async def _refresh(self, provider: str, user_id: str, lease: float) -> None:
        try:
            await self._claimed.run(provider, user_id, lease)
        finally:
            self._busy[provider] -= 1

    async def _update_stats(self) -> None:
        now = self._clock()
        lag = 0.0
        for provider in self._providers:
            stats = await self._schedule.schedule_stats(provider, now, self._policy.rt_warn_before)
            lag = max(lag, stats["lag"])
            m = self._metrics
            m.schedule_lag.labels(provider).set(stats["lag"])
            m.grants_due_next_minute.labels(provider).set(stats["due_next_minute"])
            failing, reauth = stats["refresh_failing"], stats["reauth_required"]
            m.grants.labels(provider, "active").set(max(0.0, stats["scheduled"] - failing))
            m.grants.labels(provider, "refresh_failing").set(failing)
            m.grants.labels(provider, "reauth_required").set(reauth)
            m.refresh_token_expiring.labels(provider).set(stats["refresh_token_expiring"])
            state = self._providers.breaker(provider).state
            m.circuit_state.labels(provider).set(STATE_VALUES[state])
        self.lag = lag
