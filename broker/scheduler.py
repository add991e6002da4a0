"""The background refresher: claims due grants from Redis and refreshes them before expiry.

Every replica runs one. Each tick it claims, per provider, only as many due grants as it can
start at once (free global slots, free slots for that provider, none while the provider's
circuit is open), so nothing is hoarded: a replica that dies holds a few seconds-long leases at
most, and those grants come due again for the others when the leases end. Leases are renewed
while their refresh runs; the refresh itself goes through the same per-grant lock and fenced
writes as on-demand refreshes, so the two never both spend a rotating refresh token.

A tick costs one small script call per provider whatever the number of grants stored: the
claim reads only the due end of a sorted set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from broker.circuit import STATE_VALUES
from broker.config import ProviderSettings, Settings
from broker.errors import (
    BrokerError,
    GrantNotFound,
    GrantUnreadable,
    ReauthRequired,
    StoreUnavailable,
)
from broker.metrics import Metrics
from broker.refresh import Refresher
from broker.store import GrantStore

log = structlog.get_logger(__name__)

STATS_INTERVAL = 5.0
STORE_ERROR_PAUSE = 1.0
UNREADABLE_RETRY = 3600.0  # a record that fails decryption waits for an operator (key restore)


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    concurrency: int
    provider_concurrency: int
    lease: float
    tick: float
    drain_timeout: float
    rt_warn_before: float

    @classmethod
    def from_settings(cls, s: Settings) -> SchedulerPolicy:
        return cls(
            concurrency=s.scheduler_concurrency,
            provider_concurrency=s.provider_concurrency,
            lease=s.scheduler_lease,
            tick=s.scheduler_tick,
            drain_timeout=s.shutdown_timeout,
            rt_warn_before=s.refresh_token_warn_before,
        )


class Scheduler:
    def __init__(
        self,
        store: GrantStore,
        refresher: Refresher,
        providers: Mapping[str, ProviderSettings],
        metrics: Metrics,
        policy: SchedulerPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._refresher = refresher
        self._providers = providers
        self._metrics = metrics
        self._policy = policy
        self._clock = clock
        self._busy: dict[str, int] = dict.fromkeys(providers, 0)
        self._work: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.lag = 0.0
        self.last_tick = 0.0

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="broker-scheduler")

    def stop_claiming(self) -> None:
        """The first step of shutdown: no new claims; refreshes in flight go on."""
        self._stopping.set()
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming; let refreshes in flight finish within the drain time, then hand the
        leases of any unfinished ones back so another replica takes them at once."""
        self._stopping.set()
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._work:
            _, pending = await asyncio.wait(self._work, timeout=self._policy.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _limit(self, provider: str) -> int:
        configured = self._providers[provider].max_concurrency
        return configured or self._policy.provider_concurrency

    async def _run(self) -> None:
        next_stats = 0.0
        while not self._stopping.is_set():
            try:
                await self._claim_and_start()
                if time.monotonic() >= next_stats:
                    await self._update_stats()
                    next_stats = time.monotonic() + STATS_INTERVAL
            except StoreUnavailable:
                log.warning("scheduler.store_unavailable")
                await asyncio.sleep(STORE_ERROR_PAUSE)
            except Exception:
                log.exception("scheduler.tick_failed")
                await asyncio.sleep(STORE_ERROR_PAUSE)
            self.last_tick = time.monotonic()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._policy.tick)

    async def _claim_and_start(self) -> None:
        for provider in self._providers:
            free = min(
                self._policy.concurrency - len(self._work),
                self._limit(provider) - self._busy[provider],
            )
            breaker = self._refresher.breakers[provider]
            if breaker.state == "open":
                continue
            if breaker.state == "half_open":
                free = min(free, 1)
            if free <= 0:
                continue
            now = self._clock()
            lease = now + self._policy.lease
            for user_id in await self._store.claim_due(provider, now, lease, free):
                self._busy[provider] += 1
                task = asyncio.create_task(self._refresh(provider, user_id, lease))
                self._work.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        self._wake.set()  # a slot is free: claim more now, not at the next tick

    async def _refresh(self, provider: str, user_id: str, lease: float) -> None:
        renewer = asyncio.create_task(self._keep_lease(provider, user_id, lease))
        try:
            grant = await self._refresher.refresh_due(provider, user_id)
            if grant.next_refresh_at is not None:
                # Skipped (not due after all, or the circuit opened): our lease must not stand
                # in for the real due time. A write that rescheduled it already wins.
                await self._store.move_lease(
                    provider, user_id, await renewer_score(renewer, lease), grant.next_refresh_at
                )
        except (ReauthRequired, GrantNotFound):
            # The write (or delete) normally took it off the schedule; if that update was
            # lost, this stale entry would come due every lease: remove it.
            await self._store.unschedule(provider, user_id)
        except GrantUnreadable:
            log.error(
                "security.grant_unreadable", provider=provider, user_id=user_id, trigger="scheduled"
            )
            held = await renewer_score(renewer, lease)
            await self._store.move_lease(provider, user_id, held, self._clock() + UNREADABLE_RETRY)
        except BrokerError as err:
            # Transient: the failure and its retry time were recorded on the grant; if not,
            # the lease runs out and the grant comes due again.
            log.info(
                "scheduler.refresh_deferred", provider=provider, user_id=user_id, code=err.code
            )
        except asyncio.CancelledError:
            # Shutdown ran out of drain time: hand the claim back so another replica takes it
            # now (the refresh itself, if it reached the provider, still finishes and writes).
            held = await renewer_score(renewer, lease)
            with contextlib.suppress(StoreUnavailable):
                await self._store.move_lease(provider, user_id, held, self._clock())
            raise
        except Exception:
            log.exception("scheduler.refresh_crashed", provider=provider, user_id=user_id)
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            self._busy[provider] -= 1

    async def _keep_lease(self, provider: str, user_id: str, lease: float) -> float:
        """Renew the claim every third of its length while the refresh runs; returns the
        lease score currently held (via the task's cancellation, see ``renewer_score``)."""
        try:
            while True:
                await asyncio.sleep(self._policy.lease / 3)
                renewed = self._clock() + self._policy.lease
                try:
                    if not await self._store.move_lease(provider, user_id, lease, renewed):
                        return lease  # rescheduled by a write: nothing left to hold
                except StoreUnavailable:
                    continue
                lease = renewed
        except asyncio.CancelledError:
            return lease

    async def _update_stats(self) -> None:
        now = self._clock()
        lag = 0.0
        for provider in self._providers:
            stats = await self._store.schedule_stats(provider, now, self._policy.rt_warn_before)
            lag = max(lag, stats["lag"])
            m = self._metrics
            m.schedule_lag.labels(provider).set(stats["lag"])
            m.grants_due_next_minute.labels(provider).set(stats["due_next_minute"])
            failing, reauth = stats["refresh_failing"], stats["reauth_required"]
            m.grants.labels(provider, "active").set(max(0.0, stats["scheduled"] - failing))
            m.grants.labels(provider, "refresh_failing").set(failing)
            m.grants.labels(provider, "reauth_required").set(reauth)
            m.refresh_token_expiring.labels(provider).set(stats["refresh_token_expiring"])
            state = self._refresher.breakers[provider].state
            m.circuit_state.labels(provider).set(STATE_VALUES[state])
        self.lag = lag


async def renewer_score(renewer: asyncio.Task[float], initial: float) -> float:
    """The lease score the renewer holds now (it returns it when cancelled)."""
    if renewer.done():
        return renewer.result() if not renewer.cancelled() else initial
    renewer.cancel()
    try:
        return await renewer
    except asyncio.CancelledError:
        return initial
