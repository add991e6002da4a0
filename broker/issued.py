"""Writing tokens a provider has just issued: once it rotated, the old refresh token may be
dead, so the new one must reach Redis or the user has to log in again.

A write that meets a Redis outage (a restart, a Sentinel failover, whose detection alone takes
30 s by default) is retried for ``rotated_write_window`` seconds. The write runs in a task of
its own: a caller that goes away, a cancelled scheduler task or a shutdown drain that ran out
of time does not cut it short; ``drain`` waits for the ones still retrying.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

import structlog

from broker.errors import StoreUnavailable
from broker.metrics import Metrics
from broker.models import Grant
from broker.store import GrantStore

log = structlog.get_logger(__name__)

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0

WriteOutcome = Literal["written", "conflict", "lost"]


class IssuedWriter:
    def __init__(self, store: GrantStore, metrics: Metrics, window: float) -> None:
        self._store = store
        self._metrics = metrics
        self.window = window
        self._pending: set[asyncio.Task[WriteOutcome]] = set()

    async def write(
        self,
        new: Grant,
        expected_version: int,
        *,
        on_delay: Callable[[], None] | None = None,
        lock_token: str | None = None,
    ) -> WriteOutcome:
        """Store ``new`` over ``expected_version``: "written", "conflict" (another record is
        there: the fence held), or "lost" when Redis stayed unreachable for the whole window.
        ``on_delay`` runs once, at the first failed attempt: callers can be answered with the
        new access token while the write goes on. ``lock_token``: see ``GrantStore.write``."""
        task = asyncio.create_task(self._write(new, expected_version, on_delay, lock_token))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return await asyncio.shield(task)

    async def _write(
        self,
        new: Grant,
        expected_version: int,
        on_delay: Callable[[], None] | None,
        lock_token: str | None,
    ) -> WriteOutcome:
        deadline = time.monotonic() + self.window
        delay = BACKOFF_FIRST
        attempts = 0
        while True:
            attempts += 1
            try:
                written = await self._store.write(new, expected_version, lock_token=lock_token)
            except StoreUnavailable:
                if attempts == 1:
                    log.warning(
                        "refresh.rotated_write_retrying", provider=new.provider, user_id=new.user_id
                    )
                    if on_delay is not None:
                        on_delay()
                if time.monotonic() + delay > deadline:
                    self._metrics.rotated_writes_lost.labels(new.provider).inc()
                    log.error(
                        "refresh.rotated_write_failed",
                        provider=new.provider,
                        user_id=new.user_id,
                        attempts=attempts,
                    )
                    return "lost"
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if attempts > 1:
                log.info(
                    "refresh.rotated_write_recovered",
                    provider=new.provider,
                    user_id=new.user_id,
                    attempts=attempts,
                )
            return "written" if written else "conflict"

    async def drain(self, budget: float) -> None:
        """Wait for writes still retrying, up to ``budget`` seconds."""
        if self._pending and budget > 0:
            await asyncio.wait(list(self._pending), timeout=budget)
        for task in self._pending:
            log.error("refresh.rotated_write_abandoned", detail="shutdown ran out of time")
            task.cancel()
