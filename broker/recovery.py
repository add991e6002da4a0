"""A provider answering again after an outage: the grants it left failing are made due at once
rather than after their own backoff (the scheduler's concurrency bounds the burst)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from broker.errors import StoreUnavailable
from broker.schedule import ScheduleIndex

log = structlog.get_logger("broker.refresh")  # the refresher's lines, as before they moved here


class Recovery:
    def __init__(self, schedule: ScheduleIndex, clock: Callable[[], float]) -> None:
        self._schedule = schedule
        self._clock = clock
        self.background: set[asyncio.Task[None]] = set()  # drained at shutdown (refresh.py)

    def expedite(self, provider: str) -> None:
        """Make ``provider``'s failing grants due, in the background: the refresh that saw the
        provider recover does not wait for it."""
        task = asyncio.create_task(self._expedite(provider))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _expedite(self, provider: str) -> None:
        try:
            count = await self._schedule.expedite(provider, self._clock())
        except StoreUnavailable:
            log.warning("refresh.expedite_failed", provider=provider)
            return
        log.info("refresh.provider_recovered", provider=provider, expedited=count)
