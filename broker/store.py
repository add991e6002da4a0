"""Encrypted grant records with fenced writes.

Keys of one grant share a hash tag, ``{prefix}:{<provider>:<base64url(user id)>}:grant``, so
multi-key scripts stay within one Redis Cluster slot. base64url without padding is injective and
contains no ``{`` or ``}``, so two user ids never share a key whatever characters they hold.

Each grant is a hash ``{v: version, blob: encrypted record, due, st, c, rx}``. Writes are
compare-and-set on ``v`` (a fence): a writer whose view is stale, for example a refresh whose
lock expired while a newer record was written, cannot overwrite that record. Versions never
repeat, even across a delete and a new import (see ``base_version``). ``due`` (next refresh
time), ``st`` (state) and ``rx`` (the refresh token's expiry, '' none) repeat, in clear, what
the indexes must say, so the reconciler can check them without decrypting; none is a secret
(the status endpoint shows them all).

A write or delete that changes a grant's state appends its event (docs/webhooks.md) to the
events stream in the same script, so the event is stored before the change is acknowledged
(``c``, the creation time in clear, tells a replaced grant from a refreshed one). On
a Redis Cluster the stream is in another slot than the grant: the event is appended right
after the script instead (ordered, not atomic: a process killed between the two loses it).

Key names are in ``broker/keys.py``. The ``blob`` (format and encryption) is
``broker/grant_codec.py``'s, the events stream ``broker/grant_events.py``'s. The indexes a write
updates live in ``broker/schedule.py``, locks in ``broker/locks.py``, pending authorizations in
``broker/pending.py``; all share one client (``broker/redis_client.py``), ``Keys`` and ``Guard``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster

from broker.batching import ReadBatcher
from broker.grant_cache import GrantCache
from broker.grant_codec import GrantCodec
from broker.grant_events import GrantEvents, event_data
from broker.keys import Keys, member
from broker.models import Grant, iso_ms
from broker.redis_client import Guard, script, with_wait

if TYPE_CHECKING:
    from broker.schedule import ScheduleIndex

log = structlog.get_logger(__name__)

INCARNATION_BITS = 32


@dataclass(frozen=True)
class WriteOptions:
    """The settings that shape a write's Redis commands (``min_replicas_to_ack``,
    ``replica_ack_timeout``, ``events_max_len``)."""

    min_replicas: int = 0
    ack_timeout: float = 1.0
    events_max_len: int = 100_000


class GrantStore:
    """Encrypted grant records and their fenced writes; each write updates the indexes."""

    def __init__(
        self,
        redis: aioredis.Redis,
        codec: GrantCodec,
        keys: Keys,
        guard: Guard,
        schedule: ScheduleIndex,
        *,
        cache: GrantCache | None = None,
        options: WriteOptions = WriteOptions(),
    ) -> None:
        self.redis = redis
        self.codec = codec
        # Off (never live) unless the app runs its GrantChanges listener.
        self.cache = cache if cache is not None else GrantCache(0, 1)
        self.keys = keys
        self.guard = guard
        self.schedule = schedule
        self._metrics = schedule.metrics
        self._min_replicas = options.min_replicas
        self._ack_timeout = options.ack_timeout
        # With min_replicas_to_ack a lock goes only once WAIT confirmed the write (the holder
        # releases it after); in the write's own step it would go before that confirmation.
        self.unlocks_on_write = options.min_replicas <= 0
        self._fenced_write = redis.register_script(script("fenced_write.lua"))
        self._delete = redis.register_script(script("delete_grant.lua"))
        # Whether one script may name every key a write touches: on a Redis Cluster only keys
        # of one slot, and the event stream and the indexes are in others.
        self._one_script = not isinstance(redis, RedisCluster)
        self.events = GrantEvents(
            redis, keys, guard, options.events_max_len, in_script=self._one_script
        )
        self.batch = schedule.batch
        self._reads = ReadBatcher(self.batch, ("v", "blob"))

    async def read(self, provider: str, user_id: str) -> Grant | None:
        """The stored grant, or None; GrantUnreadable if it fails authentication."""
        with self.guard("read"):
            version, blob = await self._reads.hmget(self.keys.grant_key(provider, user_id))
        return self.codec.decode_record(provider, user_id, version, blob)

    async def version(self, provider: str, user_id: str) -> int:
        """The stored version without decrypting (0 when absent): lets an import replace a
        record that can no longer be read."""
        with self.guard("read"):
            raw = await self.redis.hget(self.keys.grant_key(provider, user_id), "v")
        return int(raw) if raw is not None else 0

    async def base_version(self, current: int) -> int:
        """The version a new record is derived from (it is written as this + 1). A replaced
        record continues its own sequence; a record created where none exists starts a new
        incarnation, ``INCR`` * 2**32, so a grant deleted and created again never repeats a
        version that a stale writer of the deleted one could still hold as its fence."""
        if current:
            return current
        with self.guard("write"):
            incarnation = int(await self.redis.incr(self.keys.incarnations_key()))
        return incarnation << INCARNATION_BITS

    async def write(
        self, grant: Grant, expected_version: int, *, lock_token: str | None = None
    ) -> bool:
        """Store ``grant`` if the record is still at ``expected_version``; False if not.

        ``lock_token``: the writer holds the grant's lock with it, and the lock goes in the
        same step as the write when :attr:`unlocks_on_write` (a refresh's last round trip
        saved); never when the write does not land.

        Idempotent under redis-py's retries: a write whose reply was lost and that is sent
        again recognises itself (its ciphertext is unique) and counts as written. With
        ``min_replicas_to_ack``, ``WAIT`` goes in the same pipeline, so on the connection that
        made the write: ``WAIT`` waits for the replication offset of its own connection's last
        command, and on another connection that may be older than this write (a false
        confirmation).
        """
        blob = self.codec.encrypt(grant)
        grant_key = self.keys.grant_key(grant.provider, grant.user_id)
        keys = self.events.script_keys(grant_key)
        keys.insert(1, self.keys.lock_key(grant.provider, grant.user_id))
        due = "" if grant.next_refresh_at is None else repr(grant.next_refresh_at)
        args: list[str | bytes] = [
            str(expected_version),
            str(grant.version),
            blob,
            due,
            grant.state,
            repr(grant.created_at),
            iso_ms(grant.updated_at),
            event_data(grant.provider, grant.user_id, grant.last_error),
            grant.provider,
            str(self.events.max_len),
            self.keys.changes_channel(),
            "" if grant.refresh_token_expires_at is None else repr(grant.refresh_token_expires_at),
            lock_token if lock_token is not None and self.unlocks_on_write else "",
        ]
        if self._one_script:  # the indexes in the write's own step
            index_keys, index_args = self.schedule.index_args(grant)
            keys += index_keys
            args += index_args
        acked: int | None = None
        # Dropped before (a read racing the write must not be served after it) and after.
        self.cache.invalidate(grant_key)
        with self.guard("write"), self._invalidating(grant_key):
            if self._min_replicas <= 0:
                written = await self.batch.script(self._fenced_write, keys, args)
            else:
                written, acked = await with_wait(
                    self.redis,
                    self._fenced_write,
                    keys,
                    args,
                    self._min_replicas,
                    self._ack_timeout,
                )
        code = int(written[0])
        if not code:
            return False
        if code == 2:
            log.info("store.write_recognised", provider=grant.provider, user_id=grant.user_id)
        elif written[1] and not self._one_script:
            await self.events.append(written[1], grant.provider, written[2])
        if acked is not None and acked < self._min_replicas:
            self._metrics.replication_unconfirmed.inc()
            log.warning(
                "store.replication_unconfirmed",
                provider=grant.provider,
                user_id=grant.user_id,
                replicas=acked,
            )
        if not self._one_script:
            await self.schedule.index(grant)
        return True

    async def delete(self, provider: str, user_id: str) -> bool:
        """Delete a grant, recording ``grant.deleted``; False if there was none."""
        grant_key = self.keys.grant_key(provider, user_id)
        keys = self.events.script_keys(grant_key)
        args = [iso_ms(time.time()), event_data(provider, user_id, None), provider]
        self.cache.invalidate(grant_key)
        with self.guard("delete"), self._invalidating(grant_key):
            # Not pipelined with the index updates: a cluster pipeline runs no scripts.
            removed: list[Any] = await self._delete(
                keys=keys, args=[*args, self.events.max_len, self.keys.changes_channel()]
            )
            pipe = self.redis.pipeline(transaction=False)
            self.schedule.unindex(pipe, provider, member(user_id))
            await pipe.execute()
        if not int(removed[0]):
            return False
        if not self._one_script:
            await self.events.append(b"grant.deleted", provider, removed[1])
        return True

    async def ping(self) -> float:
        """Round-trip time to Redis in milliseconds."""
        started = time.perf_counter()
        with self.guard("ping"):
            await self.redis.ping()
        return (time.perf_counter() - started) * 1000

    @contextmanager
    def _invalidating(self, grant_key: str) -> Iterator[None]:
        try:
            yield
        finally:
            self.cache.invalidate(grant_key)
