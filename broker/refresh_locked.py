"""One refresh of one grant under its Redis lock: the provider call, its verdict, the write.

The single-flight bookkeeping around it, and the token API's rules for when to refresh, are in
``broker/refresh.py``; what makes a refresh safe is shared between the two (see there).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

import structlog

from broker.access_only import AccessOnlyGrants
from broker.errors import (
    GrantNotFound,
    ProviderRejected,
    ProviderUnavailable,
    ReauthRequired,
)
from broker.failures import Failures
from broker.issued import IssuedWriter
from broker.locks import GrantLocks, HeldLock, LockBusy, LockLost
from broker.metrics import Metrics
from broker.models import Grant, TokenSet, holds
from broker.oauth import OAuthClient
from broker.policy import RefreshPolicy, fresh_enough
from broker.providers import ProviderRegistry
from broker.recovery import Recovery
from broker.store import GrantStore

log = structlog.get_logger("broker.refresh")

Trigger = Literal["on_demand", "scheduled", "probe", "import", "reported"]


class LockedRefresh:
    """Takes a grant's lock, re-reads it, and refreshes it if it still needs it: a refresh
    token goes to the provider only while the lock is certainly ours, and what the provider
    issued is stored (or kept retrying) before the lock goes."""

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
        self.access_only = AccessOnlyGrants(store, clock)
        self.recovery = Recovery(store.schedule, clock)

    def with_tokens(
        self, grant: Grant, tokens: TokenSet, *, refreshed: bool, requested_at: float
    ) -> Grant:
        """``grant`` holding ``tokens`` (``RefreshPolicy.stamped``, with its provider's
        refresh-token maximum age)."""
        max_age = self.providers.get(grant.provider).refresh_token_max_age
        return self.policy.stamped(
            grant, tokens, refreshed=refreshed, requested_at=requested_at, max_age=max_age
        )

    async def run(
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
        renewal = self.locks.renewing(held)
        try:
            # Re-read under the lock (another replica may have refreshed already): read by
            # the very script that took it.
            assert held.record is not None
            grant = checked(
                provider, self._store.codec.decode_record(provider, user_id, *held.record)
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
            await renewal.stop()
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
            return await self.access_only.serve(grant)
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
            self.recovery.expedite(grant.provider)
        new = self.with_tokens(grant, tokens, refreshed=True, requested_at=requested_at)
        self._count(grant, "success", trigger, started)

        def answer_early() -> None:
            if not result.done():
                result.set_result(new)

        held.stage = "write"
        outcome = await self.issued.write(
            new, grant.version, on_delay=answer_early, lock_token=held.token
        )
        held.released = outcome == "written" and self._store.unlocks_on_write
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

    def _count(self, grant: Grant, outcome: str, trigger: Trigger, started: float) -> None:
        self._metrics.refreshes.labels(grant.provider, outcome, trigger).inc()
        self._metrics.refresh_duration.labels(grant.provider).observe(time.perf_counter() - started)

    async def _read(self, provider: str, user_id: str) -> Grant:
        return checked(provider, await self._store.read(provider, user_id))


def checked(provider: str, grant: Grant | None) -> Grant:
    """``grant``, or the error a caller gets when there is none or it needs re-authorization."""
    if grant is None:
        raise GrantNotFound(f"no grant for this user at {provider!r}")
    if grant.state == "reauth_required":
        raise ReauthRequired(f"the user must authorize {provider!r} again ({grant.last_error})")
    return grant
