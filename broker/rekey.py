"""Re-encrypting every record under the primary (first) encryption key while replicas serve.

The walk visits every kind of encrypted record (``broker/records.py``: grants in every state,
pending authorizations, ...) with SCAN, a bounded COUNT per call, node by node on a Redis Cluster.
For each record not under the primary key it decrypts the ciphertext read, encrypts the same
plaintext under the primary key with the same associated data, and swaps it in with a
compare-and-set on the exact ciphertext read (``lua/reencrypt.lua``). The swap changes nothing
else: not the grant's version, so a refresh in flight keeps its fence and its write of a rotated
token still lands; if any writer changed the record between the read and the swap, the swap
does nothing (that writer's record is newer and, once the new key is rolled out, already under
it), and the record is read again and looked at afresh, a few times at most.

So a run never overwrites newer data, a re-run skips what is done (resumable after any
interruption, idempotent), and the only state is in the records themselves. Records that fail
decryption are counted, logged as security events (never their content) and left alone.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from broker.census import key_label
from broker.crypto import KeyRing, record_key_id
from broker.errors import GrantUnreadable
from broker.keys import Keys, user_id_of
from broker.records import KINDS, Node, RecordKind, primaries, read_blobs, scan
from broker.redis_client import script, with_wait

security = structlog.get_logger("broker.security")

SCAN_COUNT = 200  # keys one SCAN call examines, about: bounds each step's work and memory
SWAPS_IN_FLIGHT = 16
LOOKS = 3  # a record changed meanwhile is looked at again this many times in all


@dataclass
class RekeyReport:
    """What a run saw. ``remaining``: records it left under another key (a dry run's, those a
    ``limit`` left, those that kept changing under an old key)."""

    scanned: int = 0
    rewritten: int = 0
    current: int = 0
    changed: int = 0
    unreadable: int = 0
    remaining: int = 0
    old_key_writes: int = 0  # records a writer rewrote under an old key during the run
    unconfirmed: int = 0  # swaps fewer than min_replicas_to_ack replicas confirmed in time
    complete: bool = False  # every record was looked at
    limited: bool = False  # the limit of rewrites left some under another key
    interrupted: bool = False  # stopped on request (Ctrl-C) after a whole batch
    by_key: Counter[str] = field(default_factory=Counter)
    # running processes encrypting with another key (broker/key_roster.py): refused to start
    behind: dict[str, str] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """Every record is under the primary key."""
        return self.complete and not (self.remaining or self.unreadable)


class Rekeyer:
    """One run over every record."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        keyring: KeyRing,
        *,
        dry_run: bool = False,
        limit: int | None = None,
        min_replicas: int = 0,
        ack_timeout: float = 1.0,
        scan_count: int = SCAN_COUNT,
        on_progress: Callable[[RekeyReport], None] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ring = keyring
        self._dry_run = dry_run
        self._budget = limit  # rewrites left; None: no limit
        self._min_replicas = min_replicas
        self._ack_timeout = ack_timeout
        self._count = scan_count
        self._on_progress = on_progress or (lambda report: None)
        self._stop = stop or asyncio.Event()
        self._swap = redis.register_script(script("reencrypt.lua"))
        self._slots = asyncio.Semaphore(SWAPS_IN_FLIGHT)
        self.report = RekeyReport()

    async def total(self) -> int:
        """How many keys a run will look at (a SCAN pass reading no value): for progress."""
        found = 0
        for kind in KINDS:
            for node in await primaries(self._redis):
                cursor = -1
                while cursor:
                    cursor, keys = await scan(
                        self._redis, node, max(cursor, 0), kind.pattern(self._keys), 1000
                    )
                    found += sum(kind.aad(self._keys, key) is not None for key in keys)
        return found

    async def run(self) -> RekeyReport:
        """Walk every record once (until ``limit`` rewrites); RedisError propagates."""
        for kind in KINDS:
            for node in await primaries(self._redis):
                if not await self._walk(kind, node):
                    return self.report
        self.report.complete = True
        return self.report

    async def _walk(self, kind: RecordKind, node: Node) -> bool:
        """Every record of ``kind`` on ``node``; False when the limit stopped the run."""
        cursor = -1
        while cursor:
            cursor, found = await scan(
                self._redis, node, max(cursor, 0), kind.pattern(self._keys), self._count
            )
            blobs = await read_blobs(self._redis, kind, found)
            await asyncio.gather(
                *(
                    self._record(kind, key, blob)
                    for key, blob in zip(found, blobs, strict=True)
                    if isinstance(blob, bytes)
                )
            )
            self._on_progress(self.report)
            if self._stop.is_set():
                self.report.interrupted = True
                return False
            if self._budget is not None and self._budget <= 0 and cursor:
                self.report.limited = True
                return False
        return True

    async def _record(self, kind: RecordKind, key: str, blob: bytes) -> None:
        aad = kind.aad(self._keys, key)
        if aad is None:
            return  # only looks like one of broker's keys
        report = self.report
        report.scanned += 1
        primary = self._ring.primary_id
        for look in range(LOOKS):
            kid = record_key_id(blob)
            if kid == primary:
                report.by_key[primary] += 1
                if look:
                    report.changed += 1
                else:
                    report.current += 1
                return
            if look:
                report.old_key_writes += 1
            try:
                plaintext = self._ring.decrypt(blob, aad)
            except GrantUnreadable as err:
                report.unreadable += 1
                report.by_key[key_label(self._ring, blob)] += 1
                self._log_unreadable(kind, key, kid, err.detail)
                return
            if self._budget is not None and self._budget <= 0:
                report.limited = True
                break
            if self._dry_run:
                break
            if self._budget is not None:
                self._budget -= 1  # taken before any await: concurrent records see it
            if await self._replace(kind, key, blob, self._ring.encrypt(plaintext, aad)):
                report.rewritten += 1
                report.by_key[primary] += 1
                return
            if self._budget is not None:
                self._budget += 1
            again = (await read_blobs(self._redis, kind, [key]))[0]
            if not isinstance(again, bytes):
                report.changed += 1  # deleted meanwhile
                return
            blob = again
        report.remaining += 1
        report.by_key[key_label(self._ring, blob)] += 1

    async def _replace(self, kind: RecordKind, key: str, old: bytes, new: bytes) -> bool:
        args: list[str | bytes] = [kind.field, old, new]
        async with self._slots:
            if self._min_replicas <= 0:
                return bool(await self._swap(keys=[key], args=args))
            swapped, acked = await with_wait(
                self._redis, self._swap, [key], args, self._min_replicas, self._ack_timeout
            )
            if swapped and acked < self._min_replicas:
                self.report.unconfirmed += 1  # written; a failover now could undo it
            return bool(swapped)

    def _log_unreadable(self, kind: RecordKind, key: str, kid: str | None, reason: str) -> None:
        where: dict[str, str] = {}
        parsed = self._keys.parse_grant_key(key) if kind.name == "grant" else None
        if parsed is not None:
            where = {"provider": parsed[0], "user_id": user_id_of(parsed[1])}
        security.error(
            "record.unreadable",
            kind=kind.name,
            key_id=kid if kid is not None else "(unknown format)",
            reason=reason,
            trigger="rekey",
            **where,
        )
