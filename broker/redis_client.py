"""The Redis client: one for the configured URL (a server, Sentinel, a Cluster, or the embedded
``memory://`` store), scripts from ``broker/lua``, and the guard that turns Redis failures into
``StoreUnavailable``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
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
from broker.errors import StoreUnavailable
from broker.metrics import Metrics

REDIS_RETRIES = 2
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


async def close(redis: aioredis.Redis) -> None:
    """Close a client from ``connect``, and behind Sentinel the sentinels' own connections too
    (closing the primary's client leaves those open)."""
    await redis.aclose()
    manager = getattr(getattr(redis, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def script(name: str) -> str:
    return resources.files("broker").joinpath("lua", name).read_text(encoding="utf-8")


async def with_wait(
    redis: aioredis.Redis,
    call: AsyncScript,
    keys: list[str],
    args: Sequence[str | bytes | int | float],
    replicas: int,
    ack_timeout: float,
) -> tuple[Any, int]:
    """A registered script's reply, and how many replicas confirmed the write within
    ``ack_timeout`` seconds (``WAIT``). One pipeline, so one connection: ``WAIT`` waits for the
    replication of its own connection's last write only, and on another connection could
    confirm something older (a false confirmation)."""
    pipe = redis.pipeline(transaction=False)
    await call(keys=keys, args=args, client=pipe)
    pipe.execute_command("WAIT", replicas, int(ack_timeout * 1000))
    reply, acked = await pipe.execute()
    return reply, int(acked)


class Guard:
    """Turns any Redis failure into StoreUnavailable (503 with Retry-After), counted."""

    def __init__(self, metrics: Metrics, retry_after: int = 2) -> None:
        self.metrics = metrics
        self._retry_after = retry_after

    @contextmanager
    def __call__(self, operation: str) -> Iterator[None]:
        try:
            yield
        except (RedisError, RedisClusterException) as err:
            self.metrics.redis_errors.labels(operation).inc()
            raise StoreUnavailable(
                f"Redis {operation} failed: {type(err).__name__}", retry_after=self._retry_after
            ) from err
