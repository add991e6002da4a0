"""Redis commands of one event-loop turn sent as one pipeline.

redis-py's asyncio client spends more CPU on each command (pool checkout, retry wrapper, a
timeout task per send, one system call each way) than the rest of a token request together,
and a refresh takes several commands (lock, read, write, indexes, unlock). Under load many
callers send in the same loop turn; their commands go out as one non-transactional pipeline:
one checkout, one send, one receive, replies handed back in order. Each command (each script)
stays atomic and is sent only after its caller asked, so it still sees every write acknowledged
before it; a command alone waits one loop turn more. A pipeline lost with its connection is sent
again by redis-py's retry, as a single command would be: every script sent here is idempotent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

MAX_BATCH = 256


class CommandBatcher:
    """Commands for many callers, batched per loop turn."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        # A cluster pipeline runs no scripts: those go out one by one there.
        self._scripts = not isinstance(redis, RedisCluster)
        # Each entry: commands and the one future of their replies (a list for ``execute_many``).
        self._pending: list[tuple[list[tuple[Any, ...]], asyncio.Future[Any], bool]] = []
        self._queued = 0  # commands in ``_pending``
        self._flights: set[asyncio.Task[None]] = set()

    async def execute(self, *args: Any) -> Any:
        """The reply of one command; the error of this command, if any, or of the whole
        pipeline (a connection lost) for every caller in it."""
        return await self._queue([args], many=False)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of several commands, an error in place of a failed command's reply
        (the whole pipeline's error if it was lost). One future for all: a task per command
        was the larger part of their cost."""
        replies: list[Any] = await self._queue(commands, many=True)
        return replies

    def _queue(self, commands: list[tuple[Any, ...]], *, many: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((commands, future, many))
        self._queued += len(commands)
        if self._queued >= MAX_BATCH:
            self._flush()
        return future

    async def script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | bytes | int | float]
    ) -> Any:
        """A registered script by its digest (``EVALSHA``), loaded first if Redis does not
        know it (a restarted or failed-over server): ``NOSCRIPT`` means it did not run."""
        if self._scripts:
            try:
                return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                pass
        return await script(keys=keys, args=args)

    def _flush(self) -> None:
        batch, self._pending, self._queued = self._pending, [], 0
        if not batch:
            return
        flight = asyncio.create_task(self._send(batch))
        self._flights.add(flight)
        flight.add_done_callback(self._flights.discard)

    async def _send(
        self, batch: list[tuple[list[tuple[Any, ...]], asyncio.Future[Any], bool]]
    ) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for commands, _, _ in batch:
                for args in commands:
                    pipe.execute_command(*args)
            replies = iter(await pipe.execute(raise_on_error=False))
        except asyncio.CancelledError:  # shutdown: its callers are being cancelled too
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as err:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for commands, future, many in batch:
            mine = [next(replies) for _ in commands]
            if future.done():  # its caller gave up (cancelled)
                continue
            if many:
                future.set_result(mine)
            elif isinstance(mine[0], BaseException):
                future.set_exception(mine[0])
            else:
                future.set_result(mine[0])


class ReadBatcher:
    """``HMGET key *fields`` for many callers, through a :class:`CommandBatcher`."""

    def __init__(self, redis: aioredis.Redis | CommandBatcher, fields: tuple[str, ...]) -> None:
        self._batch = redis if isinstance(redis, CommandBatcher) else CommandBatcher(redis)
        self._fields = fields

    async def hmget(self, key: str) -> list[Any]:
        """The fields' values (None where absent)."""
        reply: list[Any] = await self._batch.execute("HMGET", key, *self._fields)
        return reply
