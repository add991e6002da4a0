"""Per-client rate limits: one token bucket per client in Redis, shared by every replica.

Each check is one round trip: ``EVALSHA`` of ``lua/token_bucket.lua``, which refills the bucket
from Redis's own clock and takes a token atomically. A client's bucket is its own key, so a
flooding client empties only its bucket and other clients are not slowed.

Written here rather than with the ``limits`` library: its async Redis storage brings its own
client and connection pool (not the broker's sentinel/cluster/``memory://`` client, key prefix
and timeouts) and offers windows, not a token bucket with a burst.

The limiter fails open: when Redis is slow or unreachable a check gives up after ``timeout``
(its own, much shorter than ``redis_timeout``), the request goes on, and the failure is logged
and counted (``broker_rate_limiter_failures_total``); for ``FAIL_OPEN_FOR`` seconds after a
failure no check is attempted, so an outage adds no latency to every request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisClusterException, RedisError

from broker.config import ClientSettings
from broker.errors import RateLimited
from broker.keys import Keys
from broker.metrics import Metrics
from broker.redis_client import script

log = structlog.get_logger(__name__)

FAIL_OPEN_FOR = 1.0  # seconds without checks after a failed one


class RateLimiter:
    """Checks clients' ``rate_limit`` against their shared buckets."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        metrics: Metrics,
        *,
        timeout: float,
        fail_open_for: float = FAIL_OPEN_FOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = keys
        self._metrics = metrics
        self._timeout = timeout
        self._fail_open_for = fail_open_for
        self._clock = clock
        self._skip_until = 0.0
        self._take = redis.register_script(script("token_bucket.lua"))

    async def check(self, client: ClientSettings) -> None:
        """Take one token from ``client``'s bucket; RateLimited when it is empty. Returns at
        once for a client without a limit, and lets the request through when Redis fails."""
        limit = client.rate_limit
        if limit is None or self._clock() < self._skip_until:
            return
        try:
            async with asyncio.timeout(self._timeout):
                allowed, wait = await self._take(
                    keys=[self._keys.rate_limit_key(client.name)],
                    args=[repr(float(limit.requests_per_second)), str(limit.burst)],
                )
        except (RedisError, RedisClusterException, OSError, TimeoutError) as err:
            self._metrics.rate_limiter_failures.inc()
            self._skip_until = self._clock() + self._fail_open_for
            log.warning(
                "ratelimit.failing_open",
                client=client.name,
                error=type(err).__name__,
                skip_seconds=self._fail_open_for,
            )
            return
        if int(allowed):
            return
        self._metrics.rate_limited.labels(client.name).inc()
        seconds = float(wait.decode() if isinstance(wait, bytes) else wait)
        raise RateLimited(
            f"client {client.name!r} is over its rate limit "
            f"({limit.requests_per_second:g}/s, burst {limit.burst})",
            retry_after=math.ceil(seconds),
        )
