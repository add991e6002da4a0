"""Refreshing one grant safely, shared by the token API, imports and the scheduler.

Rotating refresh tokens die the moment they are used, so a refresh must happen once:
- within a process, concurrent callers for one grant share one refresh (single flight), run in
  its own task so a caller that disconnects cannot cancel it half-way;
- across replicas, a Redis lock per grant, renewed while the provider call runs, and a re-read
  of the grant after taking it (another replica may have refreshed already);
- every write is fenced on the version that was read, so a refresh that lost its lock cannot
  overwrite a newer record. The one exception is a newer record that only says
  ``reauth_required`` because *our* refresh spent the token it tried: our result is the truth.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Literal

import structlog

from broker.circuit import CircuitBreaker
from broker.config import ProviderSettings, Settings
from broker.errors import (
    GrantNotFound,
    ProviderNotFound,
    ProviderRejected,
    ProviderUnavailable,
    ReauthRequired,
    StoreUnavailable,
    UpstreamUnavailable,
)
from broker.metrics import Metrics
from broker.models import Grant, TokenSet, refresh_due_at
from broker.oauth import OAuthClient
from broker.store import GrantStore

log = structlog.get_logger(__name__)

Trigger = Literal["on_demand", "scheduled", "import"]
LOCK_POLL_FIRST = 0.02
LOCK_POLL_MAX = 0.25
ROTATED_WRITE_BACKOFF = 0.1
ROTATED_WRITE_BACKOFF_MAX = 1.0


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    lock_ttl: float
    lock_wait_timeout: float
    lead: float
    jitter_max: float
    failures_before_failing: int
    retry_base: float = 1.0
    retry_max: float = 300.0
    circuit_failures: int = 5
    circuit_open_for: float = 30.0
    rotated_write_window: float = 10.0

    @classmethod
    def from_settings(cls, s: Settings) -> RefreshPolicy:
        return cls(
            lock_ttl=s.lock_ttl,
            lock_wait_timeout=s.lock_wait_timeout,
            lead=s.refresh_lead,
            jitter_max=s.refresh_jitter_max,
            failures_before_failing=s.failures_before_failing,
            retry_base=s.retry_base,
            retry_max=s.retry_max,
            circuit_failures=s.circuit_failures,
            circuit_open_for=s.circuit_open_for,
            rotated_write_window=s.rotated_write_window,
        )

    def retry_delay(self, failures: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, never sooner than the provider's Retry-After
        and never sooner than half the base delay (no tight loops)."""
        ceiling = min(self.retry_max, self.retry_base * 2 ** max(0, failures - 1))
        delay = random.uniform(self.retry_base / 2, max(self.retry_base / 2, ceiling))  # noqa: S311
        return max(delay, retry_after or 0.0)


def fresh_enough(grant: Grant, min_ttl: float, now: float) -> bool:
    """Whether the held token satisfies ``min_ttl``. For a token the provider issued to us,
    ``min_ttl`` is capped at half its lifetime: a caller asking for more than the provider ever
    issues must not force a refresh on every request."""
    remaining = grant.valid_for(now)
    lifetime = grant.lifetime()
    needed = min_ttl if lifetime is None else min(min_ttl, lifetime / 2)
    return remaining > 0 and remaining >= needed


class Refresher:
    """Keeps grants' access tokens fresh without ever spending a refresh token twice."""

    def __init__(
        self,
        store: GrantStore,
        oauth: OAuthClient,
        providers: Mapping[str, ProviderSettings],
        metrics: Metrics,
        policy: RefreshPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._oauth = oauth
        self._providers = providers
        self._metrics = metrics
        self.policy = policy
        self.clock = clock
        self._inflight: dict[tuple[str, str], asyncio.Task[Grant]] = {}
        self.breakers = {
            name: CircuitBreaker(policy.circuit_failures, policy.circuit_open_for)
            for name in providers
        }

    def provider(self, name: str) -> ProviderSettings:
        try:
            return self._providers[name]
        except KeyError:
            raise ProviderNotFound(f"no provider named {name!r} is configured") from None

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
        max_age = self.provider(grant.provider).refresh_token_max_age
        if max_age is not None and new.refresh_token_issued_at is not None:
            new = replace(new, refresh_token_expires_at=new.refresh_token_issued_at + max_age)
        return new

    async def token(self, provider: str, user_id: str, min_ttl: float) -> Grant:
        """A grant whose access token lasts ``min_ttl`` (see :func:`fresh_enough`), refreshing
        first if needed; a still-valid token is served when the provider cannot refresh."""
        self.provider(provider)
        grant = await self._read(provider, user_id)
        if fresh_enough(grant, min_ttl, self.clock()):
            return grant
        grant = await self._single_flight(provider, user_id, min_ttl)
        if not fresh_enough(grant, min_ttl, self.clock()) and grant.valid_for(self.clock()) <= 0:
            raise UpstreamUnavailable("the access token expired and could not be refreshed")
        return grant

    async def refresh_due(self, provider: str, user_id: str) -> Grant:
        """Refresh a grant whose scheduled time has come (the scheduler's entry point)."""
        return await self._single_flight(provider, user_id, math.inf, trigger="scheduled")

    async def _single_flight(
        self, provider: str, user_id: str, min_ttl: float, trigger: Trigger = "on_demand"
    ) -> Grant:
        key = (provider, user_id)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(provider, user_id, min_ttl, trigger))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        return await asyncio.shield(task)

    def _forget(self, key: tuple[str, str], task: asyncio.Task[Grant]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every awaiter may have gone away

    async def drain(self) -> None:
        """Wait for refreshes in flight (shutdown): a rotated token must reach the store."""
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def _refresh(
        self, provider: str, user_id: str, min_ttl: float, trigger: Trigger
    ) -> Grant:
        try:
            async with self.locked(provider, user_id):
                grant = await self._read(provider, user_id)
                now = self.clock()
                if trigger == "scheduled":
                    if grant.next_refresh_at is not None and grant.next_refresh_at > now:
                        return grant
                elif fresh_enough(grant, min_ttl, now):
                    return grant  # another caller or replica refreshed while we waited
                return await self._refresh_locked(grant, trigger)
        except UpstreamUnavailable:
            # The lock stayed busy (a stuck replica): a still-valid token beats an error.
            grant = await self._read(provider, user_id)
            if grant.valid_for(self.clock()) > 0:
                return grant
            raise

    async def _refresh_locked(self, grant: Grant, trigger: Trigger) -> Grant:
        settings = self.provider(grant.provider)
        breaker = self.breakers[grant.provider]
        if not breaker.allow():
            if grant.valid_for(self.clock()) > 0:
                return grant
            raise UpstreamUnavailable(
                "the provider is failing; calls to it are paused",
                retry_after=math.ceil(breaker.retry_after()),
            )
        started, requested_at = time.perf_counter(), self.clock()
        try:
            tokens = await self._oauth.refresh(settings, grant.refresh_token)
        except ProviderRejected as err:
            breaker.record_success()
            self._count(grant, "rejected", trigger, started)
            await self._record_failure(grant, err.reason, final=True)
            log.warning(
                "grant.reauth_required",
                provider=grant.provider,
                user_id=grant.user_id,
                reason=err.reason,
                trigger=trigger,
            )
            raise ReauthRequired(f"the provider rejected the refresh token ({err.reason})") from err
        except ProviderUnavailable as err:
            breaker.record_failure()
            self._count(grant, "transient", trigger, started)
            failed = await self._record_failure(
                grant, err.reason, final=False, retry_after=err.retry_after
            )
            log.warning(
                "refresh.failed",
                provider=grant.provider,
                user_id=grant.user_id,
                reason=err.reason,
                failures=failed.consecutive_failures,
                trigger=trigger,
            )
            if grant.valid_for(self.clock()) > 0:
                return failed
            raise UpstreamUnavailable(
                f"the provider could not refresh the token ({err.reason})",
                retry_after=math.ceil(err.retry_after or 1),
            ) from err
        except BaseException:
            breaker.release_probe()
            raise
        breaker.record_success()
        new = self.with_tokens(grant, tokens, refreshed=True, requested_at=requested_at)
        self._count(grant, "success", trigger, started)
        stored = await self._store_rotated(grant, new)
        log.info(
            "refresh.succeeded",
            provider=grant.provider,
            user_id=grant.user_id,
            rotated=new.refresh_token != grant.refresh_token,
            expires_in=tokens.expires_in,
            trigger=trigger,
        )
        return stored

    async def _store_rotated(self, old: Grant, new: Grant) -> Grant:
        """Write tokens the provider has just issued; the old refresh token may be dead now, so
        Redis errors are retried for ``rotated_write_window`` seconds (long enough to ride out
        a Sentinel failover) rather than dropping the new one."""
        deadline = time.monotonic() + self.policy.rotated_write_window
        delay = ROTATED_WRITE_BACKOFF
        while True:
            try:
                if await self._store.write(new, old.version):
                    return new
                break
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    log.error(
                        "refresh.rotated_write_failed", provider=new.provider, user_id=new.user_id
                    )
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, ROTATED_WRITE_BACKOFF_MAX)
        current = await self._store.read(new.provider, new.user_id)
        if current is None:
            raise GrantNotFound("the grant was deleted during the refresh")
        if current.state == "reauth_required" and current.refresh_token == old.refresh_token:
            # Another replica spent our old token after our lock lapsed: ours is the live one.
            repaired = replace(new, version=current.version + 1)
            if await self._store.write(repaired, current.version):
                log.warning("refresh.repaired_reauth", provider=new.provider, user_id=new.user_id)
                return repaired
        self._metrics.lost_writes.labels(new.provider).inc()
        log.error(
            "refresh.write_conflict",
            provider=new.provider,
            user_id=new.user_id,
            read_version=old.version,
            stored_version=current.version,
        )
        return new  # its access token is valid; the newer record stays the stored truth

    async def _record_failure(
        self, grant: Grant, reason: str, *, final: bool, retry_after: float | None = None
    ) -> Grant:
        """Mark the failure on the grant and when to retry; best effort, the caller's answer
        does not depend on it."""
        now = self.clock()
        delay = self.policy.retry_delay(grant.consecutive_failures + 1, retry_after)
        failed = grant.with_failure(
            reason,
            now,
            final=final,
            failing_after=self.policy.failures_before_failing,
            retry_at=now + delay,
        )
        try:
            await self._store.write(failed, grant.version)
        except StoreUnavailable:
            log.warning(
                "refresh.failure_not_recorded",
                provider=grant.provider,
                user_id=grant.user_id,
                reason=reason,
            )
        return failed

    def _count(self, grant: Grant, outcome: str, trigger: Trigger, started: float) -> None:
        self._metrics.refreshes.labels(grant.provider, outcome, trigger).inc()
        self._metrics.refresh_duration.labels(grant.provider).observe(time.perf_counter() - started)

    async def _read(self, provider: str, user_id: str) -> Grant:
        grant = await self._store.read(provider, user_id)
        if grant is None:
            raise GrantNotFound(f"no grant for this user at {provider!r}")
        if grant.state == "reauth_required":
            raise ReauthRequired(f"the user must authorize {provider!r} again ({grant.last_error})")
        return grant

    @asynccontextmanager
    async def locked(self, provider: str, user_id: str) -> AsyncIterator[None]:
        """Hold the grant's cross-replica lock, renewed while the body runs."""
        deadline = time.monotonic() + self.policy.lock_wait_timeout
        poll = LOCK_POLL_FIRST
        while (
            token := await self._store.acquire_lock(provider, user_id, self.policy.lock_ttl)
        ) is None:
            if time.monotonic() >= deadline:
                raise UpstreamUnavailable(
                    "a refresh of this grant is stuck; try again", retry_after=1
                )
            await asyncio.sleep(poll)
            poll = min(poll * 2, LOCK_POLL_MAX)
        renewer = asyncio.create_task(self._keep_renewed(provider, user_id, token))
        try:
            yield
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            try:
                await self._store.release_lock(provider, user_id, token)
            except StoreUnavailable:
                log.warning("lock.release_failed", provider=provider, user_id=user_id)

    async def _keep_renewed(self, provider: str, user_id: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.policy.lock_ttl / 3)
            try:
                if not await self._store.renew_lock(provider, user_id, token, self.policy.lock_ttl):
                    log.warning("lock.lost", provider=provider, user_id=user_id)
                    return
            except StoreUnavailable:
                log.warning("lock.renew_failed", provider=provider, user_id=user_id)
