"""Which key each running process encrypts new records with.

``broker rekey`` re-encrypts every record under the first key of its key ring; a replica that
still encrypts with another key first (step 3 of the rotation not finished) would go on writing
records under the old key, and those would turn unreadable once that key is removed. So every
serving process keeps a key ``{prefix}:encrypting:<process>`` holding the id of the key it
encrypts with, renewed every ``ANNOUNCE_EVERY`` seconds and expiring after ``ROSTER_TTL``: a
process that is gone drops out within that time. ``broker rekey`` reads them all first and
refuses to start while any names another key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket

import redis.asyncio as aioredis
import structlog

from broker.errors import StoreUnavailable
from broker.keys import Keys
from broker.records import primaries, scan
from broker.redis_client import Guard

log = structlog.get_logger(__name__)

ANNOUNCE_EVERY = 10.0  # seconds between two renewals of a process's entry
ROSTER_TTL = 30  # seconds an entry outlives its last renewal


class KeyRoster:
    """This process's entry: announced until :meth:`run` is stopped, then removed."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, guard: Guard, key_id: str) -> None:
        self._redis = redis
        self._guard = guard
        self._key_id = key_id
        process = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._key = keys.encrypting_key(process)

    async def announce(self) -> None:
        with self._guard("roster"):
            await self._redis.set(self._key, self._key_id, ex=ROSTER_TTL)

    async def run(self, stop: asyncio.Event) -> None:
        """Renew the entry until ``stop``; Redis trouble only delays it. (An event, not
        cancellation: a cancel landing inside a client call may be swallowed.)"""
        while not stop.is_set():
            try:
                await self.announce()
            except StoreUnavailable as err:
                log.warning("roster.store_unavailable", detail=err.detail)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ANNOUNCE_EVERY)
        with contextlib.suppress(StoreUnavailable), self._guard("roster"):
            await self._redis.delete(self._key)


async def encrypting(redis: aioredis.Redis, keys: Keys) -> dict[str, str]:
    """Each running process (as it names itself) and the id of the key it encrypts with."""
    found: dict[str, str] = {}
    prefix = keys.encrypting_key("")
    for node in await primaries(redis):
        cursor = -1
        while cursor:
            cursor, names = await scan(redis, node, max(cursor, 0), prefix + "*", 500)
            for name in names:
                key_id = await redis.get(name)
                if key_id is not None:
                    text = key_id.decode() if isinstance(key_id, bytes) else str(key_id)
                    found[name.removeprefix(prefix)] = text
    return found
