"""App tokens: access tokens for a provider's own client (client-credentials grant, RFC 6749
§4.4), one per (provider, scope set), shared by all replicas.

Handled like user grants where it matters, with less at stake (there is no refresh token to
spend twice, so a lost lock costs at most a second token request, never a grant):
- one token request per (provider, scope) at a time: a single flight per process, the
  record's Redis lock (``GrantLocks`` on ``Keys.app_lock_key``) across replicas, the record
  re-read once the lock is ours (another replica may have fetched already);
- the provider's circuit breaker and the refresh policy's backoff; a failure is recorded on
  the record and never replaces its token: a still-valid token is served while the provider is
  down, and ``503 upstream_unavailable`` comes only when none is;
- writes fenced on the version read; the refresh timing rule of ``broker/policy.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from broker.app_store import AppToken, AppTokenStore, Stored, scope_id
from broker.apptoken_request import AppTokenRequests, Trigger, still_valid
from broker.config import ProviderSettings
from broker.errors import (
    AppTokenNotConfigured,
    UpstreamUnavailable,
)
from broker.locks import GrantLocks, LockBusy, LockLost
from broker.policy import fresh_enough
from broker.providers import ProviderRegistry

log = structlog.get_logger(__name__)

FLIGHT_ROUNDS = 3  # a caller joins at most this many flights (a smaller min_ttl's, a busy one's)


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[AppToken]
    min_ttl: float
    background: bool  # the scheduler's: gives way to a busy lock at once (LockBusy)


class AppTokenService:
    """Hands out app tokens and keeps them fresh."""

    def __init__(
        self,
        store: AppTokenStore,
        locks: GrantLocks,
        requests: AppTokenRequests,
        providers: ProviderRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._locks = locks
        self.providers = providers
        self.clock = clock
        self._inflight: dict[tuple[str, str], _Flight] = {}
        self._marked: dict[tuple[str, str], int] = {}  # the version whose use we recorded
        self._requests = requests

    def configured(self, provider: str) -> ProviderSettings:
        settings = self.providers.get(provider)
        if not settings.client_credentials:
            raise AppTokenNotConfigured(f"provider {provider!r} does not enable app tokens")
        return settings

    async def token(self, provider: str, scope: str, min_ttl: float) -> AppToken:
        """An app token lasting ``min_ttl`` (as :func:`fresh_enough` reads it), fetched first
        if needed; a still-valid one when the provider cannot issue a new one now."""
        self.configured(provider)
        sid = scope_id(scope)
        token = (await self.store.read(provider, sid)).token
        for _ in range(FLIGHT_ROUNDS):
            if token is not None and fresh_enough(token, min_ttl, self.clock()):
                break
            flight = self._flight(provider, scope, min_ttl, "on_demand")
            try:
                token = await asyncio.shield(flight.task)
            except LockBusy:
                if not flight.background:
                    raise
                token = (await self.store.read(provider, sid)).token  # refreshed elsewhere
                continue
            if flight.min_ttl >= min_ttl:
                break
        if token is None or token.valid_for(self.clock()) <= 0:
            raise UpstreamUnavailable("no valid app token could be obtained now")
        if self._marked.get((provider, sid)) != token.version:
            self._marked[(provider, sid)] = token.version
            await self.store.mark_used(provider, sid, self.clock())
        return token

    async def refresh_due(self, provider: str, scope: str) -> AppToken:
        """Refresh a token whose time has come (the scheduler's entry point)."""
        return await asyncio.shield(self._flight(provider, scope, 0.0, "scheduled").task)

    def retry_after(self, provider: str) -> float:
        """When a skipped refresh is worth trying again: after the next probe while the
        provider's circuit is open."""
        breaker = self.providers.breaker(provider)
        return 0.0 if breaker.state == "closed" else breaker.retry_after()

    async def drain(self, budget: float) -> None:
        """Wait up to ``budget`` s for token requests in flight (shutdown)."""
        pending = [flight.task for flight in self._inflight.values()]
        if pending and budget > 0:
            await asyncio.wait(pending, timeout=budget)

    def _flight(self, provider: str, scope: str, min_ttl: float, trigger: Trigger) -> _Flight:
        key = (provider, scope)
        flight = self._inflight.get(key)
        if flight is None:
            task = asyncio.create_task(self._fetch(provider, scope, min_ttl, trigger))
            flight = _Flight(task, min_ttl, trigger == "scheduled")
            self._inflight[key] = flight
            task.add_done_callback(lambda t: self._landed(key, flight))
        return flight

    def _landed(self, key: tuple[str, str], flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: every awaiter may have gone away

    async def _fetch(self, provider: str, scope: str, min_ttl: float, trigger: Trigger) -> AppToken:
        sid = scope_id(scope)
        background = trigger == "scheduled"
        first_seen: list[int] = []

        def satisfied(token: AppToken | None) -> bool:
            now = self.clock()
            if token is None:
                return False
            if background:  # refreshed elsewhere meanwhile
                due = token.next_refresh_at
                return token.state == "active" and due is not None and due > now
            return fresh_enough(token, min_ttl, now)

        async def no_longer_needed() -> bool:
            """The holder stored what we need, or tried and failed (its failure is ours)."""
            stored = await self.store.read(provider, sid)
            if satisfied(stored.token):
                return True
            first_seen.append(stored.version)
            failing = stored.token is not None and stored.token.state == "refresh_failing"
            return failing and stored.version != first_seen[0]

        try:
            if background:
                held = await self._locks.acquire(provider, sid, wait=0.0)
            else:
                held = await self._locks.acquire(provider, sid, until=no_longer_needed)
        except LockBusy:
            if background:
                raise
            valid = self._valid(await self.store.read(provider, sid))
            if valid is None:
                raise
            return valid  # a still-valid token beats waiting for a stuck holder
        if held is None:
            valid = self._valid(await self.store.read(provider, sid))
            if valid is None:
                raise UpstreamUnavailable("the app token could not be obtained now; try again")
            return valid
        renewal = self._locks.renewing(held)
        try:
            stored = await self.store.read(provider, sid)
            if satisfied(stored.token):
                assert stored.token is not None
                return stored.token
            try:
                return await self._requests.run(provider, scope, stored, held, trigger)
            except LockLost:
                valid = self._valid(stored)
                if valid is None:
                    raise
                return valid
        finally:
            await renewal.stop()
            await self._locks.release(held)

    def _valid(self, stored: Stored) -> AppToken | None:
        return still_valid(stored, self.clock())
