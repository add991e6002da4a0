"""Grant records, their schedule and state indexes, and pending authorizations in Redis.

Keys of one grant share a hash tag, ``{prefix}:{<provider>:<base64url(user id)>}:grant``, so
multi-key scripts stay within one Redis Cluster slot. base64url without padding is injective and
contains no ``{`` or ``}``, so two user ids never share a key whatever characters they hold.

Each grant is a hash ``{v: version, blob: encrypted record, due, st}``. Writes are
compare-and-set on ``v`` (a fence): a writer whose view is stale, for example a refresh whose
lock expired while a newer record was written, cannot overwrite that record. Versions never
repeat, even across a delete and a new import (see ``base_version``). ``due`` (next refresh
time) and ``st`` (state) repeat, in clear, what the indexes must say, so the reconciler can
check them without decrypting; neither is a secret (the status endpoint shows both).

Per provider, a sorted set schedules refreshes by due time (members are the base64url user ids),
two sets index grants by state, and a sorted set tracks refresh-token expiry. They are updated
right after each grant write with single-key commands (no cross-slot transaction); if that
update is lost, a stale schedule entry comes due and the claimer puts it right, and a missing
one is found by the reconciler (``broker/reconcile.py``).

Pending authorizations (the authorization-code flow) are single keys,
``{prefix}:authz:<sha256 of the state>``, holding an encrypted record with a Redis expiry; they
are taken (read and deleted) by one script call, so a state is consumed exactly once.
"""

from __future__ import annotations

import base64
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.config import (
    CLUSTER_SCHEME,
    SENTINEL_SCHEME,
    Settings,
    cluster_nodes,
    sentinel_target,
)
from broker.crypto import KeyRing, grant_aad
from broker.errors import GrantUnreadable, StoreUnavailable
from broker.metrics import Metrics
from broker.models import Grant

log = structlog.get_logger(__name__)

REDIS_RETRIES = 2
INCARNATION_BITS = 32
_MEMBER = re.compile(r"[A-Za-z0-9_-]+")  # base64url without padding
REDIS_HEALTH_CHECK_INTERVAL = 15


def connect(settings: Settings) -> aioredis.Redis:
    """A Redis client for the configured URL; ``memory://`` is an embedded, non-durable one."""
    if settings.is_memory_store:
        import fakeredis  # the dev default only: never the production path

        client: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        return client
    common: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), REDIS_RETRIES),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    scheme = urlsplit(settings.redis_url).scheme
    if scheme == CLUSTER_SCHEME:
        nodes, password = cluster_nodes(settings.redis_url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            password=password,
            max_connections=settings.redis_max_connections,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
        )
        # Every command and script here names keys of one slot (a grant's keys share a hash
        # tag; schedule shards are single keys), so the cluster client serves them as is.
        return cast(aioredis.Redis, cluster)
    if scheme == SENTINEL_SCHEME:
        # The sentinels name the primary; the pool asks them again after a failover.
        target = sentinel_target(settings.redis_url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels),
            sentinel_kwargs={"socket_timeout": settings.redis_timeout},
            **common,
        )
        master: aioredis.Redis = sentinel.master_for(
            target.service,
            db=target.db,
            password=target.password,
            max_connections=settings.redis_max_connections,
        )
        return master
    # A bounded pool where a burst waits (up to redis_timeout) for a connection instead of
    # failing: redis-py's plain pool raises MaxConnectionsError at its limit.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout,
        **common,
    )
    return aioredis.Redis.from_pool(pool)


def member(user_id: str) -> str:
    """A user id as a key part: base64url without padding, injective and brace-free."""
    return base64.urlsafe_b64encode(user_id.encode()).rstrip(b"=").decode()


def user_id_of(encoded: bytes | str) -> str:
    text = encoded.decode() if isinstance(encoded, bytes) else encoded
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def script(name: str) -> str:
    return resources.files("broker").joinpath("lua", name).read_text(encoding="utf-8")


class GrantStore:
    """Encrypted grant records, fenced writes and per-grant locks."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keyring: KeyRing,
        metrics: Metrics,
        *,
        prefix: str = "broker",
        retry_after: int = 2,
        min_replicas: int = 0,
        ack_timeout: float = 1.0,
        schedule_shards: int = 1,
    ) -> None:
        self._shards = schedule_shards
        self._next_shard = 0
        self._min_replicas = min_replicas
        self._ack_timeout = ack_timeout
        self.redis = redis
        self._keyring = keyring
        self._metrics = metrics
        self._prefix = prefix
        self._retry_after = retry_after
        self._fenced_write = redis.register_script(script("fenced_write.lua"))
        self._claim = redis.register_script(script("claim_due.lua"))
        self._move_lease = redis.register_script(script("move_lease.lua"))
        self._take = redis.register_script(script("take.lua"))

    def _tag(self, provider: str, user_id: str) -> str:
        return f"{self._prefix}:{{{provider}:{member(user_id)}}}"

    def schedule_key(self, provider: str, shard: int = 0) -> str:
        base = f"{self._prefix}:schedule:{provider}"
        return base if shard == 0 else f"{base}:{shard}"

    def schedule_of(self, provider: str, m: str) -> str:
        """The shard holding member ``m``: with ``schedule_shards`` > 1 one provider's schedule
        spreads over several keys, so over several Redis Cluster slots."""
        return self.schedule_key(provider, zlib.crc32(m.encode()) % self._shards)

    def state_key(self, provider: str, state: str) -> str:
        return f"{self._prefix}:state:{state}:{provider}"

    def authorization_key(self, state_hash: str) -> str:
        return f"{self._prefix}:authz:{state_hash}"

    def rt_expiry_key(self, provider: str) -> str:
        return f"{self._prefix}:rt-expiry:{provider}"

    def grant_key(self, provider: str, user_id: str) -> str:
        return self._tag(provider, user_id) + ":grant"

    def grant_key_pattern(self) -> str:
        """A SCAN pattern matching every grant key of this prefix (and no other key)."""
        return f"{self._prefix}:{{*}}:grant"

    def parse_grant_key(self, key: bytes | str) -> tuple[str, str] | None:
        """(provider, member) of a grant key, or None for a key that only looks like one."""
        text = key.decode() if isinstance(key, bytes) else key
        head, tail = f"{self._prefix}:{{", "}:grant"
        if not (text.startswith(head) and text.endswith(tail)):
            return None
        provider, _, m = text[len(head) : -len(tail)].rpartition(":")
        if not provider or not m or not _MEMBER.fullmatch(m):
            return None
        return provider, m

    def lock_key(self, provider: str, user_id: str) -> str:
        return self._tag(provider, user_id) + ":lock"

    @contextmanager
    def guard(self, operation: str) -> Iterator[None]:
        """Turn any Redis failure into StoreUnavailable (503 with Retry-After)."""
        try:
            yield
        except (RedisError, RedisClusterException) as err:
            self._metrics.redis_errors.labels(operation).inc()
            raise StoreUnavailable(
                f"Redis {operation} failed: {type(err).__name__}", retry_after=self._retry_after
            ) from err

    async def read(self, provider: str, user_id: str) -> Grant | None:
        """The stored grant, or None; GrantUnreadable if it fails authentication."""
        with self.guard("read"):
            version, blob = await self.redis.hmget(self.grant_key(provider, user_id), ["v", "blob"])
        if version is None or not isinstance(blob, bytes):
            return None
        try:
            payload = self._keyring.decrypt(blob, grant_aad(provider, user_id))
            return Grant.from_payload(provider, user_id, int(version), payload)
        except GrantUnreadable:
            self._metrics.grants_unreadable.labels(provider).inc()
            raise

    async def version(self, provider: str, user_id: str) -> int:
        """The stored version without decrypting (0 when absent): lets an import replace a
        record that can no longer be read."""
        with self.guard("read"):
            raw = await self.redis.hget(self.grant_key(provider, user_id), "v")
        return int(raw) if raw is not None else 0

    async def base_version(self, current: int) -> int:
        """The version a new record is derived from (it is written as this + 1). A replaced
        record continues its own sequence; a record created where none exists starts a new
        incarnation, ``INCR`` * 2**32, so a grant deleted and created again never repeats a
        version that a stale writer of the deleted one could still hold as its fence."""
        if current:
            return current
        with self.guard("write"):
            incarnation = int(await self.redis.incr(f"{self._prefix}:incarnations"))
        return incarnation << INCARNATION_BITS

    async def write(self, grant: Grant, expected_version: int) -> bool:
        """Store ``grant`` if the record is still at ``expected_version``; False if not.

        Idempotent under redis-py's retries: a write whose reply was lost and that is sent
        again recognises itself (its ciphertext is unique) and counts as written. With
        ``min_replicas_to_ack``, ``WAIT`` goes in the same pipeline, so on the connection that
        made the write: ``WAIT`` on another connection would confirm nothing.
        """
        blob = self._keyring.encrypt(grant.to_payload(), grant_aad(grant.provider, grant.user_id))
        keys = [self.grant_key(grant.provider, grant.user_id)]
        due = "" if grant.next_refresh_at is None else repr(grant.next_refresh_at)
        args: list[str | bytes] = [
            str(expected_version),
            str(grant.version),
            blob,
            due,
            grant.state,
        ]
        acked: int | None = None
        with self.guard("write"):
            if self._min_replicas <= 0:
                written = await self._fenced_write(keys=keys, args=args)
            else:
                pipe = self.redis.pipeline(transaction=False)
                await self._fenced_write(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", self._min_replicas, int(self._ack_timeout * 1000))
                written, acked = await pipe.execute()
        if not written:
            return False
        if int(written) == 2:
            log.info("store.write_recognised", provider=grant.provider, user_id=grant.user_id)
        if acked is not None and int(acked) < self._min_replicas:
            self._metrics.replication_unconfirmed.inc()
            log.warning(
                "store.replication_unconfirmed",
                provider=grant.provider,
                user_id=grant.user_id,
                replicas=int(acked),
            )
        await self._index(grant)
        return True

    async def _index(self, grant: Grant) -> None:
        """Schedule and state indexes after a write; best effort (they heal, see above)."""
        m, p = member(grant.user_id), grant.provider
        pipe = self.redis.pipeline(transaction=False)
        if grant.state != "reauth_required" and grant.next_refresh_at is not None:
            pipe.zadd(self.schedule_of(p, m), {m: grant.next_refresh_at})
        else:
            pipe.zrem(self.schedule_of(p, m), m)
        for state in ("refresh_failing", "reauth_required"):
            if grant.state == state:
                pipe.sadd(self.state_key(p, state), m)
            else:
                pipe.srem(self.state_key(p, state), m)
        if grant.refresh_token_expires_at is not None and grant.state != "reauth_required":
            pipe.zadd(self.rt_expiry_key(p), {m: grant.refresh_token_expires_at})
        else:
            pipe.zrem(self.rt_expiry_key(p), m)
        try:
            with self.guard("index"):
                await pipe.execute()
        except StoreUnavailable:
            log.warning("store.index_failed", provider=p, user_id=grant.user_id)

    async def delete(self, provider: str, user_id: str) -> bool:
        m = member(user_id)
        with self.guard("delete"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self.grant_key(provider, user_id))
            pipe.zrem(self.schedule_of(provider, m), m)
            pipe.zrem(self.rt_expiry_key(provider), m)
            for state in ("refresh_failing", "reauth_required"):
                pipe.srem(self.state_key(provider, state), m)
            removed: list[Any] = await pipe.execute()
        return bool(removed[0])

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
                    keys=[self.schedule_key(provider, shard)],
                    args=[now, lease_until, limit - len(claimed)],
                )
            claimed += [user_id_of(m) for m in members]
        return claimed

    async def move_lease(self, provider: str, user_id: str, lease: float, to: float | None) -> bool:
        """Move a claim from score ``lease`` to ``to`` (renew it, hand it back) or, with None,
        take it off the schedule; only if the schedule still holds our lease: a grant write may
        have rescheduled it already, and that write wins."""
        with self.guard("claim"):
            moved = await self._move_lease(
                keys=[self.schedule_of(provider, member(user_id))],
                args=[member(user_id), repr(lease), "" if to is None else repr(to)],
            )
        return bool(moved)

    async def expedite(self, provider: str, now: float, batch: int = 500) -> int:
        """Make every grant of ``provider`` in ``refresh_failing`` due at ``now`` (its backoff
        would keep it waiting after the provider came back). Scores already earlier are kept;
        members not scheduled are not added. Returns how many members were visited."""
        visited, cursor = 0, 0
        key = self.state_key(provider, "refresh_failing")
        while True:
            with self.guard("claim"):
                cursor, members = await self.redis.sscan(key, cursor, count=batch)
                if members:
                    pipe = self.redis.pipeline(transaction=False)
                    for raw in members:
                        m = raw.decode() if isinstance(raw, bytes) else str(raw)
                        pipe.zadd(self.schedule_of(provider, m), {m: now}, xx=True, lt=True)
                    await pipe.execute()
            visited += len(members)
            if cursor == 0:
                return visited

    async def failing_sample(self, provider: str) -> str | None:
        """The user id of one grant in ``refresh_failing`` (random), or None."""
        with self.guard("claim"):
            raw = await self.redis.srandmember(self.state_key(provider, "refresh_failing"))
        return user_id_of(raw) if isinstance(raw, (bytes, str)) else None

    async def schedule_stats(
        self, provider: str, now: float, rt_warn_before: float
    ) -> dict[str, float]:
        """Figures for metrics and readiness; cost independent of how many grants exist."""
        with self.guard("stats"):
            pipe = self.redis.pipeline(transaction=False)
            for shard in range(self._shards):
                key = self.schedule_key(provider, shard)
                pipe.zrange(key, 0, 0, withscores=True)
                pipe.zcount(key, now, now + 60)
                pipe.zcard(key)
            pipe.scard(self.state_key(provider, "refresh_failing"))
            pipe.scard(self.state_key(provider, "reauth_required"))
            pipe.zcount(self.rt_expiry_key(provider), "-inf", now + rt_warn_before)
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

    async def save_authorization(self, key: str, blob: bytes, ttl: float) -> bool:
        """Store a pending authorization for ``ttl`` seconds; False if the key exists."""
        with self.guard("authorization"):
            saved = await self.redis.set(key, blob, nx=True, px=max(1, int(ttl * 1000)))
        return bool(saved)

    async def take_authorization(self, key: str) -> bytes | None:
        """The pending authorization's record, deleted in the same step: of two concurrent
        takers only one gets it."""
        with self.guard("authorization"):
            blob = await self._take(keys=[key])
        return blob if isinstance(blob, bytes) else None

    async def ping(self) -> float:
        """Round-trip time to Redis in milliseconds."""
        started = time.perf_counter()
        with self.guard("ping"):
            await self.redis.ping()
        return (time.perf_counter() - started) * 1000
