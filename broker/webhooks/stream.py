"""The events stream read through one consumer group per receiver.

Each receiver has a group, ``webhook:<name>``, so every receiver gets every event, and within it
each entry goes to one replica (one consumer per process). An entry stays pending until its
delivery succeeds (or gives up); a failed attempt resets the entry's idle time, and any replica
claims it again once it has been idle for its backoff. A replica killed mid-delivery leaves its
entries pending: they age the same way and another replica claims them (``XCLAIM`` with that
minimum idle time, so of several replicas only one wins an entry). Consumers of processes that
are gone, once they hold nothing, are deleted after ``CONSUMER_GONE_AFTER`` unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from broker.keys import Keys
from broker.redis_client import Guard, script

PENDING_PAGE = 100  # pending entries looked at per turn, oldest first
CONSUMER_GONE_AFTER = 3600.0  # seconds unseen after which a consumer holding nothing is deleted


@dataclass(frozen=True, slots=True)
class Entry:
    """One event as a receiver's group holds it."""

    id: str
    type: str
    provider: str
    body: bytes
    attempts: int  # deliveries so far, this one included

    @property
    def created(self) -> float:
        """When the event was appended (unix seconds): the entry id's first part."""
        return int(self.id.partition("-")[0]) / 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(entry_id: Any, fields: dict[Any, Any], attempts: int) -> Entry:
    values = {_text(k): v for k, v in fields.items()}
    body = values.get("body", b"")
    return Entry(
        id=_text(entry_id),
        type=_text(values.get("type", "")),
        provider=_text(values.get("provider", "")),
        body=body if isinstance(body, bytes) else str(body).encode(),
        attempts=attempts,
    )


class EventStream:
    def __init__(self, redis: aioredis.Redis, keys: Keys, guard: Guard) -> None:
        self.redis = redis
        self.key = keys.events_key()
        self.guard = guard
        self._forget = redis.register_script(script("forget_consumers.lua"))

    async def ensure_group(self, group: str) -> None:
        """Create ``group`` at the stream's end (a new receiver gets events from now on)."""
        with self.guard("webhook"):
            try:
                await self.redis.xgroup_create(self.key, group, id="$", mkstream=True)
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    async def read_new(self, group: str, consumer: str, count: int) -> list[Entry]:
        with self.guard("webhook"):
            answer: Any = await self.redis.xreadgroup(group, consumer, {self.key: ">"}, count=count)
        return [_entry(i, f, 1) for _, entries in answer or [] for i, f in entries if f]

    async def claim_due(
        self, group: str, consumer: str, count: int, due_after: Callable[[int], float]
    ) -> list[Entry]:
        """Up to ``count`` pending entries (of any consumer) idle for at least ``due_after(
        attempts so far)`` seconds, now claimed by ``consumer``."""
        claimed: list[Entry] = []
        with self.guard("webhook"):
            pending = await self.redis.xpending_range(self.key, group, "-", "+", PENDING_PAGE)
            for item in pending:
                if len(claimed) >= count:
                    break
                attempts = int(item["times_delivered"])
                wait_ms = int(due_after(attempts) * 1000)
                if int(item["time_since_delivered"]) < wait_ms:
                    continue
                got: Any = await self.redis.xclaim(
                    self.key, group, consumer, wait_ms, [item["message_id"]]
                )
                # empty: another replica won it, or the stream was trimmed past it
                claimed += [_entry(i, f, attempts + 1) for i, f in got if f]
        return claimed

    async def retry_later(self, group: str, consumer: str, entry_id: str) -> None:
        """After a failed attempt: the backoff counts from now (``JUSTID`` resets the idle time
        without counting a delivery)."""
        with self.guard("webhook"):
            await self.redis.xclaim(self.key, group, consumer, 0, [entry_id], justid=True)

    async def forget_gone_consumers(self, group: str, keep: str, unseen_for: float) -> int:
        """Delete the consumers of ``group`` (but ``keep``) that hold no pending entry and were
        not seen for ``unseen_for`` seconds; how many there were."""
        with self.guard("webhook"):
            deleted = await self._forget(
                keys=[self.key], args=[group, keep, int(unseen_for * 1000)]
            )
        return int(deleted)

    async def ack(self, group: str, entry_id: str) -> None:
        with self.guard("webhook"):
            await self.redis.xack(self.key, group, entry_id)

    async def backlog(self, group: str) -> tuple[int, str | None]:
        """(entries pending, the id of the oldest undelivered entry: pending or not yet read)."""
        with self.guard("webhook"):
            summary = await self.redis.xpending(self.key, group)
            groups = await self.redis.xinfo_groups(self.key)
            last = next((g["last-delivered-id"] for g in groups if _text(g["name"]) == group), None)
            unread = (
                []
                if last is None
                else await self.redis.xrange(self.key, f"({_text(last)}", "+", count=1)
            )
        ids = [_text(summary["min"])] if summary.get("min") else []
        ids += [_text(unread[0][0])] if unread else []
        oldest = min(ids, key=lambda i: tuple(int(p) for p in i.split("-"))) if ids else None
        return int(summary.get("pending", 0)), oldest
