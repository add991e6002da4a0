"""``broker_records_by_key{key_id}``: how many encrypted records each key id holds.

Why a rolling census rather than counters that writes keep: a write would have to move one count
from the old record's key id to the new one, and the counts would live in another Redis Cluster
slot than the record, so no script can do both atomically; a crash between the two skews the
figures for ever. Instead each replica walks every record kind (``broker/records.py``) with
SCAN, one bounded step (``CENSUS_BATCH`` keys, their ciphertexts read in one pipeline) every
``key_census_interval`` seconds, and when a pass is complete publishes its counts to one small
Redis hash, ``{prefix}:records-by-key``. Every replica sets its gauge from that hash at each step,
so all show the latest complete count, whoever made it; ``broker rekey`` publishes its exact
count when it finishes, so the figures are right at once after a rotation. A scrape costs
nothing; a step costs the same whatever the number of records; a full pass over N records takes
``N / CENSUS_BATCH`` steps. Key ids not configured (removed too early, or forged) count as
``(unknown)``: ids read from records never become labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping

import redis.asyncio as aioredis
import structlog

from broker.crypto import KeyRing
from broker.errors import StoreUnavailable
from broker.keys import Keys
from broker.metrics import Metrics
from broker.records import KINDS, primaries, read_headers, scan
from broker.redis_client import Guard, script

log = structlog.get_logger(__name__)

CENSUS_BATCH = 1000  # SCAN COUNT of one step
UNKNOWN = "(unknown)"  # not a valid key id, so never one of the ring's
STARTED = "@started"


def key_label(keyring: KeyRing, blob: bytes) -> str:
    return keyring.known_key_id(blob) or UNKNOWN


async def publish(
    redis: aioredis.Redis, keys: Keys, counts: Mapping[str, int], started: float
) -> bool:
    """Make ``counts`` (a complete count that began at ``started``) the published figures,
    unless a count that began later already is."""
    pairs: list[str | int] = [item for kid, n in sorted(counts.items()) for item in (kid, n)]
    published = await redis.register_script(script("census_publish.lua"))(
        keys=[keys.census_key()], args=[repr(started), *pairs]
    )
    return bool(published)


class KeyCensus:
    """One replica's rolling count of records per key id."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        keyring: KeyRing,
        metrics: Metrics,
        guard: Guard,
        *,
        batch: int = CENSUS_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._keyring = keyring
        self._metrics = metrics
        self._guard = guard
        self._batch = batch
        self._clock = clock
        self._kind = self._node = self._cursor = 0
        self._counts: Counter[str] = Counter()
        self._started: float | None = None

    async def step(self) -> bool:
        """One bounded SCAN step of the pass, then the gauge from the published figures; True
        when this step completed (and published) a pass."""
        with self._guard("census"):
            done = await self._advance()
            await self.show()
        return done

    async def show(self) -> None:
        figures = await self._redis.hgetall(self._keys.census_key())
        gauge = self._metrics.records_by_key
        gauge.clear()
        for kid, n in figures.items():
            name = kid.decode() if isinstance(kid, bytes) else str(kid)
            if name != STARTED:
                gauge.labels(name).set(int(n))

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Steps every ``interval`` seconds until ``stop``; Redis trouble only delays it. (An
        event, not cancellation: a cancel landing inside a client call may be swallowed.)"""
        while not stop.is_set():
            try:
                await self.step()
            except StoreUnavailable as err:
                log.warning("census.store_unavailable", detail=err.detail)
            except Exception:  # a figure is not worth the task: log it and go on
                log.exception("census.failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _advance(self) -> bool:
        if self._started is None:
            self._started = self._clock()
            self._counts = Counter()
        nodes = await primaries(self._redis)
        kind = KINDS[self._kind]
        node = nodes[self._node % len(nodes)]
        self._cursor, found = await scan(
            self._redis, node, self._cursor, kind.pattern(self._keys), self._batch
        )
        for key, blob in zip(found, await read_headers(self._redis, kind, found), strict=True):
            if isinstance(blob, bytes) and kind.aad(self._keys, key) is not None:
                self._counts[key_label(self._keyring, blob)] += 1
        if self._cursor:
            return False
        self._node += 1
        if self._node < len(nodes):
            return False
        self._node = 0
        self._kind = (self._kind + 1) % len(KINDS)
        if self._kind:
            return False
        await publish(self._redis, self._keys, self._counts, self._started)
        self._started = None
        return True
