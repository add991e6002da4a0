"""Refreshing one grant safely, shared by the token API, imports and the scheduler.

Rotating refresh tokens die the moment they are used, and strict providers (RFC 9700 §4.14.2)
revoke the whole grant when a used one comes back, so a refresh token is presented once:
- within a process, concurrent callers for one grant share one refresh (single flight), run in
  its own task so a caller that disconnects cannot cancel it half-way;
- across replicas, the grant's Redis lock (``broker/locks.py``): a provider call starts only
  while the lock is certainly ours for the call's whole timeout plus the rotated-write window,
  and the grant is re-read after taking it (another replica may have refreshed already);
- tokens the provider issued are kept and their write retried through a Redis outage
  (``broker/issued.py``), while callers get the new access token at once;
- every write is fenced on the version that was read, so a stale writer changes nothing, and a
  refresh that finds a newer record afterwards returns it instead of its own verdict;
- an access token a resource server refused is replaced at most once however many callers
  report it: the refresh is needed only while the grant still holds that token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from broker.cached_reads import CachedReads
from broker.errors import UpstreamUnavailable
from broker.locks import LockBusy
from broker.models import Grant, holds
from broker.policy import fresh_enough
from broker.refresh_locked import LockedRefresh, Trigger, checked
from broker.store import GrantStore

log = structlog.get_logger(__name__)

__all__ = ["Refresher", "Trigger"]


@dataclass(slots=True)
class _Flight:
    """One refresh of one grant in this process, and what its callers wait for."""

    task: asyncio.Task[Grant]
    result: asyncio.Future[Grant]  # set early when the new tokens' write is delayed
    min_ttl: float
    background: bool  # the scheduler's: gives way to a busy lock at once (LockBusy)
    rejected: str | None = None  # a reported flight's: needed while the grant holds this token
    stored: list[Grant] = field(default_factory=list)  # what its own write stored, once landed


class Refresher:
    """Keeps grants' access tokens fresh without ever spending a refresh token twice."""

    def __init__(self, store: GrantStore, run: LockedRefresh, reads: CachedReads) -> None:
        self._store = store
        self._reads = reads
        self._run = run
        # What the other services share with the refresh itself.
        self.locks, self.providers, self.policy = run.locks, run.providers, run.policy
        self.clock, self.issued, self.with_tokens = run.clock, run.issued, run.with_tokens
        self._inflight: dict[tuple[str, str], _Flight] = {}

    async def token(self, provider: str, user_id: str, min_ttl: float) -> Grant:
        """A grant whose access token lasts ``min_ttl`` (see :func:`fresh_enough`), refreshing
        first if needed; a still-valid token is served when the provider cannot refresh, and
        so is the token of a grant that cannot be refreshed at all."""
        self.providers.get(provider)
        grant = checked(provider, await self._reads.read(provider, user_id))
        if not grant.refreshable:
            grant = await self._run.access_only.serve(grant)
            if not grant.refreshable:
                return grant
        for _ in range(3):  # a shared refresh started for a smaller min_ttl: then our own
            if fresh_enough(grant, min_ttl, self.clock()):
                return grant
            flight = self._flight(provider, user_id, min_ttl, "on_demand")
            grant, answered = await self._joined(flight, provider, user_id)
            if not answered:
                continue
            if not flight.task.done() and not fresh_enough(grant, min_ttl, self.clock()):
                # Answered early, before its write landed, and that answer no longer lasts:
                # ours starts once that flight has stored its rotated token and let go.
                await asyncio.wait([flight.task])
                continue
            if flight.min_ttl >= min_ttl:
                break
        if grant.valid_for(self.clock()) <= 0:
            raise UpstreamUnavailable("the access token expired and could not be refreshed")
        return grant

    async def replace_rejected(self, provider: str, user_id: str, rejected: str) -> Grant:
        """A grant whose access token is not ``rejected``: refreshed once if it still holds
        that token (its reporters, on every replica, share that refresh), else as it is (or
        refreshed only if its token has expired, as :meth:`token` would with ``min_ttl=0``).
        A refused token that cannot be refreshed means a user must authorize again."""
        self.providers.get(provider)
        grant = await self._read(provider, user_id)
        log.info(
            "refresh.reported",
            provider=provider,
            user_id=user_id,
            current=holds(grant, rejected),
        )
        if not grant.refreshable:
            grant = await self._run.access_only.rejected(grant, rejected)
            if not grant.refreshable:
                return await self.token(provider, user_id, 0.0)
        # A flight of this grant already running here (on demand, scheduled, or for another
        # reported token) may end with the rejected token still held: then ours starts.
        for _ in range(3):
            if not holds(grant, rejected):
                if grant.valid_for(self.clock()) > 0:
                    return grant
                return await self.token(provider, user_id, 0.0)
            flight = self._flight(provider, user_id, 0.0, "reported", rejected)
            grant, answered = await self._joined(flight, provider, user_id)
            if not answered:
                continue
            reported = flight.rejected
            if reported is not None and holds(grant, rejected) and holds(grant, reported):
                break  # a flight for this very token could not replace it (provider failing)
        raise UpstreamUnavailable("the rejected access token could not be replaced now")

    async def _joined(self, flight: _Flight, provider: str, user_id: str) -> tuple[Grant, bool]:
        """The flight's grant, and whether it answers us: False when it was a scheduled one
        that gave way to a busy lock (the grant as stored comes back instead)."""
        try:
            return await asyncio.shield(flight.result), True
        except LockBusy:
            if not flight.background:
                raise
            return await self._read(provider, user_id), False

    async def refresh_due(self, provider: str, user_id: str, *, probe: bool = False) -> Grant:
        """Refresh a grant whose scheduled time has come (the scheduler's entry point); a
        ``probe`` of a half-open circuit refreshes it whatever its due time."""
        flight = self._flight(provider, user_id, 0.0, "probe" if probe else "scheduled")
        return await asyncio.shield(flight.result)

    async def refresh_scheduled(self, provider: str, user_id: str) -> tuple[Grant, bool]:
        """:meth:`refresh_due`, and whether the grant returned is one this refresh's own write
        stored: that write rescheduled it (the schedule holds its new due time, not a lease)."""
        flight = self._flight(provider, user_id, 0.0, "scheduled")
        grant = await asyncio.shield(flight.result)
        return grant, any(stored is grant for stored in flight.stored)

    def in_flight(self, provider: str, user_id: str) -> bool:
        """Whether this process is refreshing that grant now."""
        return (provider, user_id) in self._inflight

    def _flight(
        self,
        provider: str,
        user_id: str,
        min_ttl: float,
        trigger: Trigger,
        rejected: str | None = None,
    ) -> _Flight:
        """The refresh of this grant in flight in this process, or a new one."""
        key = (provider, user_id)
        flight = self._inflight.get(key)
        if flight is None:
            result: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
            stored: list[Grant] = []
            task = asyncio.create_task(
                self._run.run(provider, user_id, min_ttl, trigger, result, rejected, stored)
            )
            background = trigger in ("scheduled", "probe")
            flight = _Flight(
                task, result, 0.0 if background else min_ttl, background, rejected, stored
            )
            self._inflight[key] = flight
            task.add_done_callback(lambda t: self._landed(key, flight))
        return flight

    def _landed(self, key: tuple[str, str], flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        task, result = flight.task, flight.result
        if not result.done():
            if task.cancelled():
                result.cancel()
            elif (error := task.exception()) is not None:
                result.set_exception(error)
            else:
                result.set_result(task.result())
        elif not task.cancelled():
            task.exception()  # retrieved: its result went out early
        if not result.cancelled():
            result.exception()  # retrieved: every awaiter may have gone away

    async def drain(self, budget: float) -> None:
        """Wait (up to ``budget`` s) for refreshes in flight, then for writes of issued
        tokens still retrying: a rotated token must reach the store (shutdown)."""
        deadline = time.monotonic() + budget
        pending = [f.task for f in self._inflight.values()] + list(self._run.recovery.background)
        if pending and budget > 0:
            await asyncio.wait(pending, timeout=budget)
        await self.issued.drain(deadline - time.monotonic())

    async def _read(self, provider: str, user_id: str) -> Grant:
        return checked(provider, await self._store.read(provider, user_id))
