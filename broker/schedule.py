"""The refresh schedule and the state indexes of grants, in Redis.

Per provider, a sorted set (or ``schedule_shards`` of them, for a Redis Cluster) schedules
refreshes by due time, members being base64url user ids; claims move an entry to a lease score.
Two sets index grants by state, and a sorted set tracks refresh-token expiry. The write script
updates them in the write's own step; on a Redis Cluster, where they are in other slots, right
after each grant write with single-key commands (no cross-slot transaction), and a lost update
is found by the reconciler (``broker/reconcile.py``).
"""

from __future__ import annotations

import math
from typing import Any

import redis.asyncio as aioredis
import structlog

from broker.batching import CommandBatcher
from broker.errors import StoreUnavailable
from broker.keys import Keys, member, user_id_of
from broker.metrics import Metrics
from broker.models import Grant
from broker.redis_client import Guard, script

log = structlog.get_logger(__name__)


class ScheduleIndex:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, guard: Guard, metrics: Metrics, shards: int = 1
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.guard = guard
        self.metrics = metrics
        self._shards = shards
        self._next_shard = 0
        self.batch = CommandBatcher(redis)
        self._claim = redis.register_script(script("claim_due.lua"))
        self._move_lease = redis.register_script(script("move_lease.lua"))

    def index_args(self, grant: Grant) -> tuple[list[str], list[str]]:
        """Keys and arguments of a grant's index entries for ``fenced_write.lua``, which updates
        them in the write's own step where one script may name them all (not on a Redis
        Cluster): the member, its schedule score and its refresh-token expiry ('' = none)."""
        m, p = member(grant.user_id), grant.provider
        keys = [
            self.keys.schedule_of(p, m),
            self.keys.state_key(p, "refresh_failing"),
            self.keys.state_key(p, "reauth_required"),
            self.keys.rt_expiry_key(p),
        ]
        score = _schedule_score(grant)
        rt = grant.refresh_token_expires_at if grant.state != "reauth_required" else None
        return keys, [m, "" if score is None else repr(score), "" if rt is None else repr(rt)]

    async def index(self, grant: Grant) -> None:
        """Schedule and state indexes after a write, where the write could not update them in
        its own step (a Redis Cluster); best effort (the reconciler heals them)."""
        keys, (m, score, rt) = self.index_args(grant)  # the entries the write script sets
        schedule, failing, reauth, expiry = keys
        commands: list[tuple[Any, ...]] = [
            ("ZADD", schedule, score, m) if score else ("ZREM", schedule, m),
            ("SADD" if grant.state == "refresh_failing" else "SREM", failing, m),
            ("SADD" if grant.state == "reauth_required" else "SREM", reauth, m),
            ("ZADD", expiry, rt, m) if rt else ("ZREM", expiry, m),
        ]
        try:
            with self.guard("index"):
                # Batched with other callers' commands of this loop turn (broker/batching.py).
                for reply in await self.batch.execute_many(commands):
                    if isinstance(reply, BaseException):
                        raise reply
        except StoreUnavailable:
            log.warning("store.index_failed", provider=grant.provider, user_id=grant.user_id)

    def unindex(self, pipe: Any, provider: str, m: str) -> None:
        """Queue the removal of a deleted grant's index entries on ``pipe``."""
        pipe.zrem(self.keys.schedule_of(provider, m), m)
        pipe.zrem(self.keys.rt_expiry_key(provider), m)
        for state in ("refresh_failing", "reauth_required"):
            pipe.srem(self.keys.state_key(provider, state), m)

    async def claim_due(
        self, provider: str, now: float, lease_until: float, limit: int
    ) -> list[str]:
        """User ids of up to ``limit`` due grants, leased to us until ``lease_until``. Shards
        are visited from a rotating start so none is starved."""
        claimed: list[str] = []
        self._next_shard = (self._next_shard + 1) % self._shards
        for step in range(self._shards):
            if len(claimed) >= limit:
                break
            shard = (self._next_shard + step) % self._shards
            with self.guard("claim"):
                members = await self._claim(
                    keys=[self.keys.schedule_key(provider, shard)],
                    args=[now, lease_until, limit - len(claimed)],
                )
            claimed += [user_id_of(m) for m in members]
        return claimed

    async def move_lease(self, provider: str, user_id: str, lease: float, to: float | None) -> bool:
        """Move a claim from score ``lease`` to ``to`` (renew it, hand it back) or, with None,
        take it off the schedule; only if the schedule still holds our lease: a grant write may
        have rescheduled it already, and that write wins."""
        with self.guard("claim"):
            moved = await self.batch.script(
                self._move_lease,
                [self.keys.schedule_of(provider, member(user_id))],
                [member(user_id), repr(lease), "" if to is None else repr(to)],
            )
        return bool(moved)

    async def expedite(self, provider: str, now: float, batch: int = 500) -> int:
        """Make every grant of ``provider`` in ``refresh_failing`` due at ``now`` (its backoff
        would keep it waiting after the provider came back). Scores already earlier are kept;
        members not scheduled are not added. Returns how many members were visited."""
        visited, cursor = 0, 0
        key = self.keys.state_key(provider, "refresh_failing")
        while True:
            with self.guard("claim"):
                cursor, members = await self.redis.sscan(key, cursor, count=batch)
                if members:
                    pipe = self.redis.pipeline(transaction=False)
                    for raw in members:
                        m = raw.decode() if isinstance(raw, bytes) else str(raw)
                        pipe.zadd(self.keys.schedule_of(provider, m), {m: now}, xx=True, lt=True)
                    await pipe.execute()
            visited += len(members)
            if cursor == 0:
                return visited

    async def failing_sample(self, provider: str) -> str | None:
        """The user id of one grant in ``refresh_failing`` (random), or None."""
        with self.guard("claim"):
            raw = await self.redis.srandmember(self.keys.state_key(provider, "refresh_failing"))
        return user_id_of(raw) if isinstance(raw, (bytes, str)) else None

    async def schedule_stats(
        self, provider: str, now: float, rt_warn_before: float
    ) -> dict[str, float]:
        """Figures for metrics and readiness; cost independent of how many grants exist."""
        with self.guard("stats"):
            pipe = self.redis.pipeline(transaction=False)
            for shard in range(self._shards):
                key = self.keys.schedule_key(provider, shard)
                pipe.zrange(key, 0, 0, withscores=True)
                pipe.zcount(key, now, now + 60)
                pipe.zcard(key)
            pipe.scard(self.keys.state_key(provider, "refresh_failing"))
            pipe.scard(self.keys.state_key(provider, "reauth_required"))
            pipe.zcount(self.keys.rt_expiry_key(provider), "-inf", now + rt_warn_before)
            *per_shard, failing, reauth, rt_expiring = await pipe.execute()
        firsts = [entry[0][1] for entry in per_shard[0::3] if entry]
        due_soon = sum(per_shard[1::3])
        scheduled = sum(per_shard[2::3])
        lag = max(0.0, now - min(firsts)) if firsts else 0.0
        return {
            "lag": lag,
            "due_next_minute": due_soon,
            "scheduled": scheduled,
            "refresh_failing": failing,
            "reauth_required": reauth,
            "refresh_token_expiring": rt_expiring,
        }


def _schedule_score(grant: Grant) -> float | None:
    """A grant's score in its provider's schedule; None: not scheduled."""
    if grant.state != "reauth_required" and grant.next_refresh_at is not None:
        return grant.next_refresh_at
    if grant.state == "active" and not grant.refreshable:
        # An access token alone without expiry: never due, but held here so the schedule's
        # size still counts every active grant (``broker_grants``).
        return math.inf
    return None
