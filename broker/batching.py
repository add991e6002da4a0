"""Grant reads of one event-loop turn sent to Redis as one pipeline.

redis-py's asyncio client spends more CPU on each command (pool checkout, retry wrapper, a
timeout task per send, one system call each way) than the rest of a token request together.
Under load many requests read in the same loop turn; their ``HMGET``s go out as one
non-transactional pipeline: one checkout, one send, one receive, replies handed back in order.
Each ``HMGET`` stays atomic and is sent only after its caller asked, so a read still sees every
write acknowledged before it; a read alone waits one loop turn more.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

MAX_BATCH = 256


class ReadBatcher:
    """``HMGET key *fields`` for many callers, batched per loop turn."""

    def __init__(self, redis: aioredis.Redis, fields: tuple[str, ...]) -> None:
        self._redis = redis
        self._fields = list(fields)
        self._pending: list[tuple[str, asyncio.Future[list[Any]]]] = []
        self._flights: set[asyncio.Task[None]] = set()

    async def hmget(self, key: str) -> list[Any]:
        """The fields' values (None where absent); the error of this command, if any, or of
        the whole pipeline (a connection lost) for every caller in it."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((key, future))
        if len(self._pending) >= MAX_BATCH:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        flight = asyncio.create_task(self._send(batch))
        self._flights.add(flight)
        flight.add_done_callback(self._flights.discard)

    async def _send(self, batch: list[tuple[str, asyncio.Future[list[Any]]]]) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, _ in batch:
                pipe.hmget(key, self._fields)
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:  # shutdown: its callers are being cancelled too
            for _, future in batch:
                future.cancel()
            raise
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller gave up (cancelled)
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)
