"""Decrypted grants kept in this process for the token hot path, and what keeps them true.

A cached grant is served only while this process hears every change to grant records: each
script that writes or deletes one (``fenced_write.lua``, ``delete_grant.lua``) publishes the
grant's key on the channel ``{prefix}:grant-changes`` in the same step, and
:class:`GrantChanges` drops the entry when the message arrives (milliseconds after the write is
acknowledged). Whatever may have gone unheard empties the cache: it is filled only while the
subscription is confirmed, and emptied whenever the subscription is lost or (re)made; an entry
is served only while the listener has heard from Redis within ``HEARD_WITHIN`` seconds (it
pings every second), so a connection cut off without a word stops serving; after
``DEAF_AFTER`` seconds the listener drops it and subscribes on a new one. A write by
this process drops its entry at once, before the write is sent and after it returns. A change
nobody publishes (someone editing Redis by hand, a replica of an older version) is served for
at most ``max_age`` seconds. An entry asked for in the last quarter of its life is read again
in the background (:meth:`GrantCache.lookup`), so a grant in steady demand is always answered
from the cache: a miss waits for Redis behind every request that arrived meanwhile, the tail
of a busy replica's latency. The cache never feeds a refresh: the refresh path reads Redis
under the grant's lock, and every write is fenced on that read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import suppress

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from broker.metrics import Metrics
from broker.models import Grant

log = structlog.get_logger(__name__)

RESUBSCRIBE_BACKOFF = (0.1, 0.5, 1.0, 2.0)
QUIET = 1.0  # seconds between the listener's pings
STOP_WAIT = 2.0  # seconds stop() waits for the listener to end
HEARD_WITHIN = 3.0  # seconds since Redis last answered the listener for entries to be served
# Seconds of silence after which the listener drops its connection and makes a new one: a
# connection whose peer vanished without a reset would otherwise stay silent (and the cache
# off) until the kernel gives up on it, a quarter of an hour later.
DEAF_AFTER = 5.0
# An entry read this late in its life (a share of max_age left) is read again in the background.
RENEW_WITHIN = 0.25


class GrantCache:
    """Grants by Redis key, each for at most ``max_age`` seconds, at most ``max_entries``
    (the oldest go first), and only while :attr:`live`."""

    def __init__(
        self, max_age: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self.live = False
        self._heard_until = 0.0
        self._clock = clock
        self._entries: dict[str, tuple[float, float, Grant]] = {}  # expiry, renewal, grant
        self._renewing: set[str] = set()
        # Bumped by every change heard: a read that started before a change must not fill
        # the cache with what it read (the change may have landed after the read).
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Grant | None:
        return self.lookup(key)[0]

    def lookup(self, key: str) -> tuple[Grant | None, bool]:
        """The entry's grant, and whether the caller should read it again now (late in its
        life, and no other caller is doing so: :meth:`renewed` when done)."""
        entry = self._entries.get(key)
        if entry is None:
            return None, False
        now = self._clock()
        if now >= entry[0]:
            del self._entries[key]
            return None, False
        if now > self._heard_until:
            return None, False
        if now < entry[1] or key in self._renewing:
            return entry[2], False
        self._renewing.add(key)
        return entry[2], True

    def renewed(self, key: str) -> None:
        self._renewing.discard(key)

    def heard(self) -> None:
        """Redis answered the listener: its connection delivered everything sent before."""
        self._heard_until = self._clock() + HEARD_WITHIN

    def put(self, key: str, grant: Grant | None, generation: int) -> None:
        """Keep ``grant`` (None: there is none), read at ``generation``, unless something
        changed since."""
        if not self.live or generation != self.generation or self.max_age <= 0:
            return
        self._entries.pop(key, None)  # re-inserted last: the oldest are first to go
        if grant is None:
            return
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        now = self._clock()
        self._entries[key] = (now + self.max_age, now + self.max_age * (1 - RENEW_WITHIN), grant)

    def invalidate(self, key: str) -> None:
        self.generation += 1
        self._entries.pop(key, None)

    def only_local_writers(self) -> None:
        """Live for good, with nothing to listen to: the embedded store lives in this process,
        so every write to it drops its entry here."""
        self.reset(live=True)
        self._heard_until = float("inf")

    def reset(self, *, live: bool) -> None:
        self.generation += 1
        self._entries.clear()
        self.live = live


class GrantChanges:
    """Listens on the grant-changes channel and keeps a :class:`GrantCache` true; the cache is
    live only while the subscription is confirmed. Runs until :meth:`stop`."""

    def __init__(self, redis: Redis, channel: str, cache: GrantCache, metrics: Metrics) -> None:
        self._redis = redis
        self.channel = channel
        self._cache = cache
        self._metrics = metrics
        self._failures = 0
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._pubsub: PubSub | None = None
        self._heard = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="grant-changes")

    async def stop(self) -> None:
        """Ends the listener at its next message, which a ping makes arrive at once. Reads
        block without a timeout (a pinger task keeps the channel talking): Python 3.11 can
        swallow a cancellation that meets a timed read, so cancelling is the last resort."""
        self._stopped = True
        if self._task is None:
            return
        await self._ping()
        done, _ = await asyncio.wait({self._task}, timeout=STOP_WAIT)
        if not done:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_WAIT)

    async def run(self) -> None:
        try:
            while not self._stopped:
                try:
                    await self._listen()
                except (RedisError, RedisClusterException, OSError) as err:
                    log.warning("grant_cache.unsubscribed", error=type(err).__name__)
                except Exception:  # a listener that stopped would leave the cache off for good
                    log.exception("grant_cache.listener_failed")
                if self._stopped:
                    break
                backoff = RESUBSCRIBE_BACKOFF
                await asyncio.sleep(backoff[min(self._failures, len(backoff) - 1)])
                self._failures += 1
        finally:
            self._cache.reset(live=False)

    async def _listen(self) -> None:
        if isinstance(self._redis, RedisCluster):
            await self._redis.initialize()  # its pub/sub picks a node from the slot map
        pubsub = self._pubsub = self._redis.pubsub()
        pinging: asyncio.Task[None] | None = None
        try:
            await pubsub.subscribe(self.channel)
            assert pubsub.connection is not None
            # redis-py reconnects and subscribes again by itself: what was published while it
            # was away went unheard, so nothing is served until the new confirmation.
            pubsub.connection.register_connect_callback(self._reconnected)
            pinging = asyncio.create_task(self._pinger())
            while not self._stopped:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                self._heard = time.monotonic()
                self._cache.heard()
                if message["type"] == "subscribe":
                    # Nothing published before this moment was heard: start empty.
                    self._reset(live=True)
                    self._failures = 0
                    log.info("grant_cache.subscribed", channel=self.channel)
                elif message["type"] == "message":
                    data = message["data"]
                    self._cache.invalidate(data.decode() if isinstance(data, bytes) else data)
        finally:
            self._reset(live=False)
            if pinging is not None:
                pinging.cancel()
            self._pubsub = None
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _pinger(self) -> None:
        self._heard = time.monotonic()
        while True:
            await asyncio.sleep(QUIET)
            pubsub = self._pubsub
            silent = time.monotonic() - self._heard
            if silent > DEAF_AFTER and pubsub is not None and pubsub.connection is not None:
                log.warning("grant_cache.deaf", silent_seconds=round(silent, 1))
                # The blocked read then fails: redis-py connects and subscribes again (which
                # empties the cache until the new confirmation), or the listener does.
                self._heard = time.monotonic()
                await pubsub.connection.disconnect(nowait=True)
                continue
            await self._ping()

    async def _ping(self) -> None:
        """A PING on the subscribed connection: its answer (or an error) wakes the listener."""
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is not None:
            with suppress(RedisError, RedisClusterException, OSError):
                await pubsub.ping()

    async def _reconnected(self, _: object) -> None:
        self._reset(live=False)

    def _reset(self, *, live: bool) -> None:
        self._cache.reset(live=live)
        self._metrics.grant_cache_resets.inc()
