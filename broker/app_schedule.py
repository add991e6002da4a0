"""The background refresher of app tokens: a small loop beside the grants' scheduler.

Each tick claims (``claim_due.lua``, leases as for grants) up to its free slots of due records
from the one app-token schedule, whose size is the number of (provider, scope) records in use,
so a tick costs one script call whatever the number of user grants. A claimed token is
refreshed through ``AppTokenService.refresh_due`` (lock, breaker, backoff, fenced write, which
reschedules it); one nobody was handed since its last refresh is taken off the schedule, and
is fetched on demand when a client asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from broker.apptokens import AppTokenService
from broker.errors import BrokerError, StoreUnavailable, Unavailable
from broker.locks import LockBusy

log = structlog.get_logger(__name__)

STORE_ERROR_PAUSE = 1.0
BUSY_MARGIN = 0.05


class AppTokenScheduler:
    def __init__(
        self,
        service: AppTokenService,
        *,
        tick: float,
        lease: float,
        concurrency: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._store = service.store
        self._tick = tick
        self._lease = lease
        self._concurrency = concurrency
        self._clock = clock
        self._work: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.ticks = 0  # completed ticks: lets a test wait for the loop to have looked

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="broker-app-token-scheduler")

    def stop_claiming(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def stop(self, budget: float) -> None:
        """Stop claiming; refreshes in flight get ``budget`` s, then are cancelled (their
        leases run out and another replica takes them: nothing is lost but a token request)."""
        self.stop_claiming()
        if self._loop_task is not None:
            await self._loop_task
        if self._work:
            _, pending = await asyncio.wait(self._work, timeout=max(0.0, budget))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                free = self._concurrency - len(self._work)
                if free > 0:
                    now = self._clock()
                    lease = now + self._lease
                    for provider, sid in await self._store.claim_due(now, lease, free):
                        task = asyncio.create_task(self._refresh(provider, sid, lease))
                        self._work.add(task)
                        task.add_done_callback(self._done)
            except StoreUnavailable:
                log.warning("app_scheduler.store_unavailable")
                await asyncio.sleep(STORE_ERROR_PAUSE)
            except Exception:
                log.exception("app_scheduler.tick_failed")
                await asyncio.sleep(STORE_ERROR_PAUSE)
            self.ticks += 1
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        self._wake.set()

    async def _refresh(self, provider: str, sid: str, lease: float) -> None:
        to: float | None
        try:
            stored = await self._store.read(provider, sid)
            token = stored.token
            try:
                self._service.configured(provider)
            except BrokerError:
                token = None  # the provider or its app tokens are no longer configured
            if token is None or stored.used < token.access_issued_at:
                to = None  # gone, or not handed out since its last refresh: no one needs it
            else:
                refreshed = await self._service.refresh_due(provider, token.scope)
                to = refreshed.next_refresh_at  # a write rescheduled it already: that wins
                now = self._clock()
                if to is None or to <= now:  # skipped (circuit open): not again at once
                    to = now + max(self._lease, self._service.retry_after(provider))
        except LockBusy as err:  # being fetched elsewhere: look when that lock has run out
            to = self._clock() + err.busy_for + BUSY_MARGIN
        except Unavailable as err:  # the failure and its retry time are on the record
            to = self._clock() + max(err.retry_after, self._lease)
        except BrokerError as err:
            log.info("app_scheduler.refresh_deferred", provider=provider, problem=err.code)
            to = self._clock() + self._lease
        except Exception:
            log.exception("app_scheduler.refresh_crashed", provider=provider)
            to = self._clock() + self._lease
        with contextlib.suppress(StoreUnavailable):
            await self._store.move_lease(provider, sid, lease, to)
