"""Per-grant locks in Redis, and holding one for exactly as long as we know it is ours.

A rotating refresh token may be presented once. Only the holder of the grant's lock presents it,
and the holder must know until when the lock is certainly still its own, whatever happened in
between (a frozen process, a lost Redis connection): ``valid_until`` is measured on the
monotonic clock from *before* the command that set the lock's expiry was sent, so Redis expired
it no earlier. ``ensure`` lets a caller start work (a provider call and the write of its result)
only when the lock stays ours for all of it; a ``Renewal`` extends it meanwhile.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.errors import StoreUnavailable, UpstreamUnavailable
from broker.rearm import Rearming
from broker.redis_client import script, with_wait
from broker.store import GrantStore

log = structlog.get_logger(__name__)

Record = tuple[Any, Any]  # a grant's stored ``v`` and ``blob`` (None where absent)

POLL_FIRST = 0.02
POLL_MAX = 0.25
RENEW_RETRY = 0.5  # after a failed renewal (Redis unreachable), try again this soon


class LockBusy(UpstreamUnavailable):
    """Another holder has the lock for ``busy_for`` more seconds at most (its expiry)."""

    def __init__(self, busy_for: float) -> None:
        super().__init__(
            "a refresh of this grant is in progress elsewhere; try again",
            retry_after=max(1, round(busy_for)),
        )
        self.busy_for = busy_for


class LockLost(UpstreamUnavailable):
    """The lock may no longer be ours (or will not stay ours long enough): stop using the
    grant's refresh token."""

    def __init__(self, detail: str = "the refresh lock of this grant could not be kept") -> None:
        super().__init__(detail, retry_after=1)


class LockStore:
    """The lock keys themselves: take, renew and release, each one idempotent script."""

    def __init__(
        self,
        store: GrantStore,
        *,
        min_replicas: int = 0,
        ack_timeout: float = 1.0,
        key: Callable[[str, str], str] | None = None,
    ):
        self._store = store
        # whose locks: grants' by default, app tokens' (provider, scope id) with Keys.app_lock_key
        self._key = key or store.keys.lock_key
        self._min_replicas = min_replicas
        self._ack_timeout = ack_timeout
        redis = store.redis
        self._acquire = redis.register_script(script("lock_acquire.lua"))
        self._acquire_read = redis.register_script(script("lock_acquire_read.lua"))
        self._renew = redis.register_script(script("lock_renew.lua"))
        self._release = redis.register_script(script("lock_release.lua"))

    async def acquire(self, provider: str, user_id: str, ttl: float) -> str | float:
        """An owner token if we took the lock, else the seconds the holder's lock has left;
        never blocks (see ``acquire_reading``)."""
        taken, _ = await self._take(provider, user_id, ttl, read=False)
        return taken

    async def acquire_reading(
        self, provider: str, user_id: str, ttl: float
    ) -> tuple[str | float, Record | None]:
        """``acquire`` for a grant's lock, and when we took it, the grant's record (``v``,
        ``blob``) read in the same script: the read a holder must make after taking the lock,
        one round trip sooner."""
        return await self._take(provider, user_id, ttl, read=True)

    async def _take(
        self, provider: str, user_id: str, ttl: float, *, read: bool
    ) -> tuple[str | float, Record | None]:
        """With ``min_replicas_to_ack`` the lock is replicated before we rely on it (``WAIT`` on
        the same connection), so a failover right after cannot hand it to another replica; a
        lock the replicas did not confirm in time is used anyway, logged and counted."""
        token = secrets.token_hex(16)
        keys = [self._key(provider, user_id)]
        if read:
            keys.append(self._store.keys.grant_key(provider, user_id))
        script = self._acquire_read if read else self._acquire
        args: list[str | int] = [token, int(ttl * 1000)]
        acked: int | None = None
        with self._store.guard("lock"):
            if self._min_replicas <= 0:
                reply = await self._store.batch.script(script, keys, args)
            else:
                reply, acked = await with_wait(
                    self._store.redis, script, keys, args, self._min_replicas, self._ack_timeout
                )
        taken = int(reply[0] if read else reply)
        if taken == 1 and acked is not None and acked < self._min_replicas:
            # Used anyway (refusing would stop every refresh while a replica is down), but
            # counted: a failover now could hand this lock to another replica.
            self._store.guard.metrics.replication_unconfirmed.inc()
            log.warning(
                "lock.replication_unconfirmed",
                provider=provider,
                user_id=user_id,
                replicas=acked,
            )
        if taken != 1:
            return -taken / 1000, None
        return token, (reply[1], reply[2]) if read else None

    async def renew(self, provider: str, user_id: str, token: str, ttl: float) -> bool:
        with self._store.guard("lock"):
            renewed = await self._store.batch.script(
                self._renew, [self._key(provider, user_id)], [token, int(ttl * 1000)]
            )
        return bool(renewed)

    async def release(self, provider: str, user_id: str, token: str) -> None:
        with self._store.guard("lock"):
            await self._store.batch.script(self._release, [self._key(provider, user_id)], [token])


@dataclass
class HeldLock:
    provider: str
    user_id: str
    token: str
    valid_until: float  # monotonic; the lock is certainly ours until then
    lost: bool = False
    released: bool = False  # by the write that stored its refresh's result (GrantStore.write)
    acquired_at: float = field(default_factory=time.monotonic)
    stage: str = "acquired"  # what the holder is doing: told when a hold lasts too long
    record: Record | None = None  # the grant's, read with the lock (``acquire(read=True)``)

    def remaining(self) -> float:
        return 0.0 if self.lost or self.released else self.valid_until - time.monotonic()


class GrantLocks:
    """Taking, keeping and releasing grant locks for the services."""

    def __init__(self, store: LockStore, ttl: float, wait_timeout: float) -> None:
        self._store = store
        self.ttl = ttl
        self.wait_timeout = wait_timeout

    async def acquire(
        self,
        provider: str,
        user_id: str,
        *,
        wait: float | None = None,
        until: Callable[[], Awaitable[bool]] | None = None,
        read: bool = False,
    ) -> HeldLock | None:
        """Take the lock, waiting up to ``wait`` (default ``lock_wait_timeout``) for its holder;
        None as soon as ``until()`` says the wait is no longer needed (checked between polls:
        the holder may have stored what we wanted). LockBusy when the wait runs out (at once
        with ``wait=0``), with how long the holder's lock can last. With ``read``, the held
        lock carries the grant's record read in the same step (``record``)."""
        deadline = time.monotonic() + (self.wait_timeout if wait is None else wait)
        poll = POLL_FIRST
        while True:
            sent = time.monotonic()
            if read:
                token, record = await self._store.acquire_reading(provider, user_id, self.ttl)
            else:
                token, record = await self._store.acquire(provider, user_id, self.ttl), None
            if isinstance(token, str):
                return HeldLock(provider, user_id, token, sent + self.ttl, record=record)
            if time.monotonic() + poll > deadline:
                raise LockBusy(token)
            if until is not None and await until():
                return None
            await asyncio.sleep(poll)
            poll = min(poll * 2, POLL_MAX)

    async def renew(self, held: HeldLock) -> bool:
        """Extend the lock now; False (and ``held.lost``) if it is no longer ours."""
        if held.lost or held.released:
            return False
        sent = time.monotonic()
        if await self._store.renew(held.provider, held.user_id, held.token, self.ttl):
            held.valid_until = sent + self.ttl
            return True
        held.lost = True
        # While the refresh's result is being written, that write may itself have released the
        # lock (GrantStore.unlocks_on_write): no warning then; a write that did not land says so
        # itself (refresh.write_conflict, refresh.rotated_write_*).
        lost = log.info if held.stage == "write" else log.warning
        lost("lock.lost", provider=held.provider, user_id=held.user_id, stage=held.stage)
        return False

    async def ensure(self, held: HeldLock, needed: float) -> None:
        """Return only if the lock stays ours for ``needed`` more seconds (renewing it first
        if it would not); LockLost otherwise."""
        if held.remaining() >= needed:
            return
        try:
            renewed = await self.renew(held)
        except StoreUnavailable as err:
            raise LockLost() from err
        if not renewed or held.remaining() < needed:
            raise LockLost()

    def renewing(self, held: HeldLock) -> Renewal:
        """Renew ``held`` every quarter of the lock's lifetime until ``Renewal.stop``."""
        return Renewal(self, held)

    async def release(self, held: HeldLock) -> None:
        if held.lost or held.released:
            return
        try:
            await self._store.release(held.provider, held.user_id, held.token)
        except StoreUnavailable:
            log.warning("lock.release_failed", provider=held.provider, user_id=held.user_id)

    @asynccontextmanager
    async def holding(self, provider: str, user_id: str) -> AsyncIterator[HeldLock]:
        """Hold the lock (renewed) while the body runs: imports, deletes, code exchanges."""
        held = await self.acquire(provider, user_id)
        assert held is not None  # no ``until``: acquire returns a lock or raises
        renewal = self.renewing(held)
        try:
            yield held
        finally:
            await renewal.stop()
            await self.release(held)


class Renewal:
    """Renews a held lock every quarter of its lifetime until stopped, or until the lock is
    lost (``broker/rearm.py``: a timer between renewals, a task only for a renewal)."""

    def __init__(self, locks: GrantLocks, held: HeldLock) -> None:
        self._locks = locks
        self._held = held
        self._warned = False
        self._rearming = Rearming(locks.ttl / 4, self._renew)

    @property
    def active(self) -> bool:
        return self._rearming.active

    async def _renew(self) -> float | None:
        """The delay to the next renewal; None: no more."""
        held, ttl = self._held, self._locks.ttl
        if held.lost:
            return None
        held_for = time.monotonic() - held.acquired_at
        if held_for > ttl and not self._warned:
            self._warned = True  # a hold longer than a whole lock_ttl: something is stuck
            log.error(
                "lock.held_long",
                provider=held.provider,
                user_id=held.user_id,
                stage=held.stage,
                held_for=round(held_for, 1),
            )
        try:
            if not await self._locks.renew(held):
                return None
        except StoreUnavailable:
            log.warning("lock.renew_failed", provider=held.provider, user_id=held.user_id)
            return min(RENEW_RETRY, ttl / 4)
        return ttl / 4

    async def stop(self) -> None:
        await self._rearming.stop()
