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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import structlog

from broker.access_only import AccessOnlyGrants
from broker.errors import (
    GrantNotFound,
    ProviderRejected,
    ProviderUnavailable,
    ReauthRequired,
    StoreUnavailable,
    UpstreamUnavailable,
)
from broker.failures import Failures
from broker.issued import IssuedWriter
from broker.locks import GrantLocks, HeldLock, LockBusy, LockLost
from broker.metrics import Metrics
from broker.models import Grant, TokenSet, holds, refresh_due_at
from broker.oauth import OAuthClient
from broker.policy import RefreshPolicy, fresh_enough
from broker.providers import ProviderRegistry
from broker.store import GrantStore

log = structlog.get_logger(__name__)

Trigger = Literal["on_demand", "scheduled", "probe", "import", "reported"]


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

    def __init__(
        self,
        store: GrantStore,
        locks: GrantLocks,
        oauth: OAuthClient,
        providers: ProviderRegistry,
        metrics: Metrics,
        policy: RefreshPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.locks = locks
        self._oauth = oauth
        self.providers = providers
        self._metrics = metrics
        self.policy = policy
        self.clock = clock
        self.issued = IssuedWriter(store, metrics, policy.rotated_write_window)
        self._failures = Failures(store, metrics, policy, clock)
        self._access_only = AccessOnlyGrants(store, clock)
        self._inflight: dict[tuple[str, str], _Flight] = {}
        self._background: set[asyncio.Task[None]] = set()

    def with_tokens(
        self, grant: Grant, tokens: TokenSet, *, refreshed: bool, requested_at: float
    ) -> Grant:
        """``grant`` holding ``tokens``, scheduled per the refresh-timing rule, its refresh
        token's expiry stamped when the provider states a maximum age. Lifetimes count from
        ``requested_at``, when we asked: the provider's clock started no earlier, so we never
        believe a token lives longer than the provider does."""
        now = requested_at
        due = refresh_due_at(
            now + tokens.expires_in,
            tokens.expires_in,
            lead=self.policy.lead,
            jitter_max=self.policy.jitter_max,
        )
        new = grant.with_tokens(tokens, now, next_refresh_at=due, refreshed=refreshed)
        if not new.refreshable:
            # Never refreshed: indexed at its stated expiry only, to be marked then.
            return replace(new, next_refresh_at=new.access_expires_at)
        max_age = self.providers.get(grant.provider).refresh_token_max_age
        if max_age is not None and new.refresh_token_issued_at is not None:
            new = replace(new, refresh_token_expires_at=new.refresh_token_issued_at + max_age)
        return new

    async def token(self, provider: str, user_id: str, min_ttl: float) -> Grant:
        """A grant whose access token lasts ``min_ttl`` (see :func:`fresh_enough`), refreshing
        first if needed; a still-valid token is served when the provider cannot refresh, and
        so is the token of a grant that cannot be refreshed at all."""
        self.providers.get(provider)
        grant = self._checked(provider, await self._store.read_cached(provider, user_id))
        if not grant.refreshable:
            grant = await self._access_only.serve(grant)
            if not grant.refreshable:
                return grant
        for _ in range(2):  # a shared refresh started for a smaller min_ttl: then our own
            if fresh_enough(grant, min_ttl, self.clock()):
                return grant
            flight = self._flight(provider, user_id, min_ttl, "on_demand")
            grant, answered = await self._joined(flight, provider, user_id)
            if not answered:
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
            grant = await self._access_only.rejected(grant, rejected)
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
                self._refresh(provider, user_id, min_ttl, trigger, result, rejected, stored)
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

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, budget: float) -> None:
        """Wait (up to ``budget`` s) for refreshes in flight, then for writes of issued
        tokens still retrying: a rotated token must reach the store (shutdown)."""
        deadline = time.monotonic() + budget
        pending = [f.task for f in self._inflight.values()] + list(self._background)
        if pending and budget > 0:
            await asyncio.wait(pending, timeout=budget)
        await self.issued.drain(deadline - time.monotonic())

    async def _refresh(
        self,
        provider: str,
        user_id: str,
        min_ttl: float,
        trigger: Trigger,
        result: asyncio.Future[Grant],
        rejected: str | None = None,
        stored: list[Grant] | None = None,
    ) -> Grant:
        def satisfied(grant: Grant) -> bool:
            now = self.clock()
            if trigger == "probe":
                return False
            if rejected is not None:
                # Replaced meanwhile (by another flight or replica): the new token is the
                # answer, whatever its remaining lifetime.
                return not holds(grant, rejected)
            if trigger == "scheduled":
                # Not due yet (refreshed elsewhere meanwhile). A failing grant is tried
                # whenever it is claimed: a recovered provider made it due early.
                due = grant.next_refresh_at
                return grant.state == "active" and due is not None and due > now
            return fresh_enough(grant, min_ttl, now)

        first_seen: list[int] = []

        async def no_longer_needed() -> bool:
            """The holder stored what we need, or tried and failed (its failure is our answer:
            no point in waiting to fail again)."""
            grant = await self._store.read(provider, user_id)
            if grant is None or grant.state == "reauth_required" or satisfied(grant):
                return True
            first_seen.append(grant.version)
            return grant.state == "refresh_failing" and grant.version != first_seen[0]

        # The scheduler never waits for a busy lock: its holder is refreshing already, and the
        # scheduler tries again when that lock can have expired at the latest (LockBusy).
        background = trigger in ("scheduled", "probe")
        try:
            if background:
                held = await self.locks.acquire(provider, user_id, wait=0.0, read=True)
            else:
                held = await self.locks.acquire(
                    provider, user_id, until=no_longer_needed, read=True
                )
        except LockBusy:
            if background:
                raise
            grant = await self._read(provider, user_id)
            if rejected is not None and not satisfied(grant):
                raise  # the rejected token is no answer
            if grant.valid_for(self.clock()) > 0:
                return grant  # a still-valid token beats an error
            raise
        if held is None:
            return await self._read(provider, user_id)  # another holder stored what we need
        renewer = asyncio.create_task(self.locks.keep_renewed(held))
        try:
            # Re-read under the lock (another replica may have refreshed already): read by
            # the very script that took it.
            assert held.record is not None
            grant = self._checked(
                provider, self._store.decode_record(provider, user_id, *held.record)
            )
            if satisfied(grant):
                return grant
            try:
                return await self._refresh_locked(grant, held, trigger, result, stored)
            except LockLost:
                if rejected is None and (background or grant.valid_for(self.clock()) > 0):
                    return grant
                raise
        finally:
            await self.locks.stop_renewing(held, renewer)
            await self.locks.release(held)

    async def _refresh_locked(
        self,
        grant: Grant,
        held: HeldLock,
        trigger: Trigger,
        result: asyncio.Future[Grant],
        stored: list[Grant] | None = None,
    ) -> Grant:
        refresh_token = grant.refresh_token
        if refresh_token is None:
            # Never taken to the token endpoint: due only to be marked at its expiry.
            return await self._access_only.serve(grant)
        settings = self.providers.get(grant.provider)
        breaker = self.providers.breaker(grant.provider)
        # The lock must stay ours through the call and the write of its result: another
        # replica presenting this refresh token meanwhile would be a reuse.
        held.stage = "ensure"
        await self.locks.ensure(held, self.policy.call_budget)
        held.stage = "breaker"
        if not breaker.allow():
            return await self._failures.circuit_open(grant, breaker, trigger)
        started, requested_at = time.perf_counter(), self.clock()
        held.stage = "provider_call"
        try:
            tokens = await self._oauth.refresh(settings, refresh_token)
        except ProviderRejected as err:
            breaker.record_success()
            self._count(grant, "rejected", trigger, started)
            held.stage = "record_rejection"
            return await self._failures.rejected(grant, err, trigger)
        except ProviderUnavailable as err:
            breaker.record_failure(err.reason)
            self._count(grant, "transient", trigger, started)
            held.stage = "record_failure"
            if err.rotated_refresh_token not in (None, refresh_token):
                return await self._failures.rotated(grant, err, trigger, self.issued)
            return await self._failures.transient(grant, err, trigger)
        except BaseException:
            breaker.release_probe()
            raise
        if breaker.record_success():
            self._spawn(self._expedite(grant.provider))
        new = self.with_tokens(grant, tokens, refreshed=True, requested_at=requested_at)
        self._count(grant, "success", trigger, started)

        def answer_early() -> None:
            if not result.done():
                result.set_result(new)

        held.stage = "write"
        outcome = await self.issued.write(new, grant.version, on_delay=answer_early)
        log.info(
            "refresh.succeeded",
            provider=grant.provider,
            user_id=grant.user_id,
            rotated=new.refresh_token != grant.refresh_token,
            expires_in=tokens.expires_in,
            trigger=trigger,
            stored=outcome,
        )
        if outcome == "written" and stored is not None:
            stored.append(new)
        if outcome == "conflict":
            current = await self._store.read(new.provider, new.user_id)
            if current is None:
                raise GrantNotFound("the grant was deleted during the refresh")
            self._metrics.lost_writes.labels(new.provider).inc()
            log.error(
                "refresh.write_conflict",
                provider=new.provider,
                user_id=new.user_id,
                read_version=grant.version,
                stored_version=current.version,
            )
        return new  # its access token is valid whatever happened to the write

    async def _expedite(self, provider: str) -> None:
        """The provider answers again: grants left failing by the outage are due now, not
        after their own backoff (the scheduler's concurrency bounds the burst)."""
        try:
            count = await self._store.schedule.expedite(provider, self.clock())
        except StoreUnavailable:
            log.warning("refresh.expedite_failed", provider=provider)
            return
        log.info("refresh.provider_recovered", provider=provider, expedited=count)

    def _count(self, grant: Grant, outcome: str, trigger: Trigger, started: float) -> None:
        self._metrics.refreshes.labels(grant.provider, outcome, trigger).inc()
        self._metrics.refresh_duration.labels(grant.provider).observe(time.perf_counter() - started)

    async def _read(self, provider: str, user_id: str) -> Grant:
        return self._checked(provider, await self._store.read(provider, user_id))

    @staticmethod
    def _checked(provider: str, grant: Grant | None) -> Grant:
        if grant is None:
            raise GrantNotFound(f"no grant for this user at {provider!r}")
        if grant.state == "reauth_required":
            raise ReauthRequired(f"the user must authorize {provider!r} again ({grant.last_error})")
        return grant
