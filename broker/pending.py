"""Pending authorizations (the authorization-code flow): single keys
``{prefix}:authz:<sha256 of the state>`` holding an encrypted record with a Redis expiry, taken
(read and deleted) by one script call, so a state is consumed exactly once."""

from __future__ import annotations

import redis.asyncio as aioredis

from broker.keys import Keys
from broker.redis_client import Guard, script


class PendingAuthorizations:
    def __init__(self, redis: aioredis.Redis, keys: Keys, guard: Guard) -> None:
        self.redis = redis
        self.keys = keys
        self.guard = guard
        self._take = redis.register_script(script("take.lua"))

    async def save(self, key: str, blob: bytes, ttl: float) -> bool:
        """Store a pending authorization for ``ttl`` seconds; False if the key exists."""
        with self.guard("authorization"):
            saved = await self.redis.set(key, blob, nx=True, px=max(1, int(ttl * 1000)))
        return bool(saved)

    async def take(self, key: str) -> bytes | None:
        """The pending authorization's record, deleted in the same step: of two concurrent
        takers only one gets it."""
        with self.guard("authorization"):
            blob = await self._take(keys=[key])
        return blob if isinstance(blob, bytes) else None
