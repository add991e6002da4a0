"""Finding grants the indexes lost: every grant on the schedule, every state set and the
refresh-token expiry index right.

On one server (or Sentinel) the write script updates the indexes in the write's own step. On a
Redis Cluster they are updated after each grant write with single-key commands (no cross-slot
transaction), so a Redis error or a crash between the two can leave a grant off the schedule:
nothing would refresh it until a caller asks. Anywhere, entries can be lost without a write
(a hand edit, a failover that lost the last writes). The reconciler walks the grant keys with
SCAN, a bounded batch per step, compares each grant's ``due``, ``st`` and ``rx`` fields (written
with the record, in clear) with the schedule, the state sets and the expiry index, and repairs
what differs. A step costs the same whatever the number of grants; a full pass takes
``grants / reconcile_batch`` steps.

On one server (or Sentinel) a script checks and repairs a whole batch at one instant
(``lua/reconcile_batch.lua``). On a Redis Cluster a grant's indexes live in other slots than its
record, so the reconciler reads both with pipelines and re-reads the version before repairing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio.cluster import RedisCluster

from broker.errors import GrantUnreadable
from broker.keys import user_id_of
from broker.metrics import Metrics
from broker.redis_client import script
from broker.store import GrantStore

log = structlog.get_logger(__name__)

STATE_SETS = ("refresh_failing", "reauth_required")


@dataclass(frozen=True, slots=True)
class _Seen:
    provider: str
    member: str
    key: bytes
    version: bytes
    due: str
    state: str
    rt_expiry: str | None  # '' none; None not known (written before 'rx' was kept in clear)


SCRIPT_BATCH = 250  # grants one script call checks: bounds how long it holds the server


class IndexReconciler:
    def __init__(self, store: GrantStore, metrics: Metrics, batch: int) -> None:
        self._store = store
        self._metrics = metrics
        self._batch = batch
        self._cursors: dict[str, int] = {}  # per cluster node ("" for one server)
        self._node = 0
        self._pattern = store.keys.grant_key_pattern()
        # One server (or Sentinel): a batch is checked and repaired by one script call, about a
        # fifth of the client's CPU of five commands a grant (the idle cost, docs/performance.md).
        self._script = (
            None
            if isinstance(store.redis, RedisCluster)
            else store.redis.register_script(script("reconcile_batch.lua"))
        )

    async def step(self) -> int:
        """Check one batch of grants and repair their index entries; returns the repairs."""
        with self._store.guard("reconcile"):
            keys = await self._scan()
            if self._script is not None:
                return await self._check_in_scripts(keys)
            seen = await self._fields(keys)
            return await self._repair(seen)

    async def _check_in_scripts(self, keys: list[bytes]) -> int:
        keys_of = self._store.keys
        parsed = [(key, ids) for key in keys if (ids := keys_of.parse_grant_key(key))]
        repairs = 0
        legacy: list[bytes] = []
        for first in range(0, len(parsed), SCRIPT_BATCH):
            chunk = parsed[first : first + SCRIPT_BATCH]
            script_keys: list[bytes | str] = []
            members = []
            for key, (provider, m) in chunk:
                script_keys += [
                    key,
                    keys_of.schedule_of(provider, m),
                    *(keys_of.state_key(provider, state) for state in STATE_SETS),
                    keys_of.rt_expiry_key(provider),
                ]
                members.append(m)
            assert self._script is not None
            found = await self._script(keys=script_keys, args=members)
            for number, what in zip(found[::2], found[1::2], strict=True):
                key, (provider, m) = chunk[int(number) - 1]
                if _text(what) == "legacy":
                    legacy.append(key)
                else:
                    repairs += self._count(provider, m, _text(what))
        if legacy:
            repairs += await self._repair(await self._fields(legacy))
        return repairs

    async def _scan(self) -> list[bytes]:
        redis: Any = self._store.redis
        if isinstance(redis, RedisCluster):
            cluster: Any = redis
            nodes = cluster.get_primaries()
            if not nodes:
                return []
            self._node = (self._node + 1) % len(nodes)
            node = nodes[self._node]
            cursors, keys = await cluster.scan(
                cursor=self._cursors.get(node.name, 0),
                match=self._pattern,
                count=self._batch,
                target_nodes=node,
            )
            self._cursors[node.name] = cursors[node.name]
            return list(keys)
        cursor, keys = await redis.scan(
            self._cursors.get("", 0), match=self._pattern, count=self._batch
        )
        self._cursors[""] = cursor
        return list(keys)

    async def _fields(self, keys: list[bytes]) -> list[_Seen]:
        parsed = [(key, self._store.keys.parse_grant_key(key)) for key in keys]
        parsed = [(key, ids) for key, ids in parsed if ids is not None]
        if not parsed:
            return []
        pipe = self._store.redis.pipeline(transaction=False)
        for key, _ in parsed:
            pipe.hmget(key, ["v", "due", "st", "rx"])
        rows = await pipe.execute()
        seen = []
        for (key, ids), (version, due, state, rx) in zip(parsed, rows, strict=True):
            assert ids is not None
            provider, member = ids
            if version is None:
                continue  # deleted since the scan
            if state is None:  # written before records carried their index fields
                legacy = await self._legacy(provider, member)
                if legacy is None:
                    continue
                due, state, rx = legacy
            expiry = None if rx is None else _text(rx)
            seen.append(
                _Seen(provider, member, key, version, _text(due or b""), _text(state), expiry)
            )
        return seen

    async def _legacy(self, provider: str, member: str) -> tuple[bytes, bytes, bytes] | None:
        try:
            grant = await self._store.read(provider, user_id_of(member))
        except GrantUnreadable:
            return None
        if grant is None:
            return None
        due = b"" if grant.next_refresh_at is None else repr(grant.next_refresh_at).encode()
        expires = grant.refresh_token_expires_at
        return due, grant.state.encode(), b"" if expires is None else repr(expires).encode()

    async def _repair(self, seen: list[_Seen]) -> int:
        if not seen:
            return 0
        store = self._store
        pipe = store.redis.pipeline(transaction=False)
        for s in seen:
            pipe.zscore(store.keys.schedule_of(s.provider, s.member), s.member)
            for state in STATE_SETS:
                pipe.sismember(store.keys.state_key(s.provider, state), s.member)
            pipe.zscore(store.keys.rt_expiry_key(s.provider), s.member)
            pipe.hget(s.key, "v")
        answers = await pipe.execute()
        fixes = store.redis.pipeline(transaction=False)
        repairs = 0
        for i, s in enumerate(seen):
            score, *members, expiry, version = answers[i * 5 : i * 5 + 5]
            if version != s.version:
                continue  # written meanwhile: that write updated the indexes itself
            if s.state != "reauth_required" and s.due and score is None:
                fixes.zadd(store.keys.schedule_of(s.provider, s.member), {s.member: s.due}, nx=True)
                repairs += self._count(s.provider, s.member, "schedule")
            for state, is_member in zip(STATE_SETS, members, strict=True):
                if bool(is_member) != (s.state == state):
                    key = store.keys.state_key(s.provider, state)
                    (fixes.sadd if s.state == state else fixes.srem)(key, s.member)
                    repairs += self._count(s.provider, s.member, state)
            if s.rt_expiry is not None:
                wanted = s.state != "reauth_required" and s.rt_expiry != ""
                if wanted != (expiry is not None):
                    key = store.keys.rt_expiry_key(s.provider)
                    if wanted:
                        fixes.zadd(key, {s.member: s.rt_expiry}, nx=True)
                    else:
                        fixes.zrem(key, s.member)
                    repairs += self._count(s.provider, s.member, "refresh_token_expiry")
        if repairs:
            await fixes.execute()
        return repairs

    def _count(self, provider: str, member: str, index: str) -> int:
        self._metrics.index_repairs.labels(provider, index).inc()
        log.warning(
            "reconcile.repaired", provider=provider, user_id=user_id_of(member), index=index
        )
        return 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
