"""A step repeated after a delay until stopped: a timer waits between steps and a task runs
only for a step itself. Holding a lock or a lease for one refresh used to start a task that
slept and was cancelled at the end: a measurable part of a refresh's CPU (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Rearming:
    """Runs ``step`` ``delay`` seconds from now, then again after the delay each run returns,
    until a run returns None or :meth:`stop`. Stopping ends it by a flag as well as by
    cancellation: on Python 3.11 a cancellation that races a timeout inside redis-py can be
    swallowed (``asyncio.wait_for``), and a step that survived it must not arm the next one."""

    def __init__(self, delay: float, step: Callable[[], Awaitable[float | None]]) -> None:
        self._step = step
        self._stopped = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(delay, self._due)

    @property
    def active(self) -> bool:
        """A step is waiting for its time or under way."""
        return self._timer is not None or (self._task is not None and not self._task.done())

    def _due(self) -> None:
        self._timer = None
        if not self._stopped:
            self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        delay = await self._step()
        if delay is not None and not self._stopped:
            self._timer = self._loop.call_later(delay, self._due)

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
