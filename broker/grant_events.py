"""The events stream (docs/webhooks.md) as the grant scripts of ``broker/store.py`` feed it,
and their fallback on a Redis Cluster, where the stream is in another slot than the grant.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis
import structlog

from broker.errors import StoreUnavailable
from broker.keys import Keys
from broker.redis_client import Guard

log = structlog.get_logger("broker.store")  # the name its lines had before this module


class GrantEvents:
    """The stream's key and length for the grant scripts, and its Redis Cluster fallback."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, guard: Guard, max_len: int, *, in_script: bool
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._guard = guard
        # Trimming does not ask whether a receiver still waits for an entry (docs/webhooks.md).
        self.max_len = max_len
        self._in_script = in_script

    def script_keys(self, grant_key: str) -> list[str]:
        return [grant_key, self._keys.events_key()] if self._in_script else [grant_key]

    async def add(self, event_type: bytes | str, provider: str, body: bytes | str) -> None:
        """Append an event on its own (no grant write carries it); StoreUnavailable if Redis
        fails."""
        with self._guard("event"):
            await self._redis.xadd(
                self._keys.events_key(),
                {"type": event_type, "provider": provider, "body": body},
                maxlen=self.max_len,
                approximate=True,
            )

    async def append(self, event_type: bytes, provider: str, body: bytes) -> None:
        """The Redis Cluster fallback: the event right after its grant write, before the caller
        is answered. The grant is written whatever happens here, so a failure is logged and
        counted, not raised: the event is lost."""
        try:
            await self.add(event_type, provider, body)
        except StoreUnavailable:
            log.error("store.event_lost", provider=provider, event=event_type.decode())


def event_data(provider: str, user_id: str, last_error: str | None) -> str:
    """An event's ``data`` object but its closing brace and ``state`` (the script adds them)."""
    return json.dumps(
        {"provider": provider, "user_id": user_id, "last_error": last_error},
        ensure_ascii=False,
        separators=(",", ":"),
    )[:-1]
