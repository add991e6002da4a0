"""What a failed refresh leaves on the grant, fenced like every write: a failure is never
recorded over a newer record, and a newer record found instead is returned, not overruled.

A transient failure is retried after a backoff, but no later than the access token's expiry,
and a failure that leaves the access token expired marks the grant ``refresh_failing`` at
once: status and ``broker_grants`` then tell the truth within seconds, also while the
provider's circuit is open and no call is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import structlog

from broker.circuit import CircuitBreaker
from broker.errors import (
    ProviderRejected,
    ProviderUnavailable,
    ReauthRequired,
    StoreUnavailable,
    UpstreamUnavailable,
)
from broker.issued import IssuedWriter
from broker.metrics import Metrics
from broker.models import Grant
from broker.policy import RefreshPolicy
from broker.store import GrantStore

log = structlog.get_logger(__name__)


class Failures:
    def __init__(
        self,
        store: GrantStore,
        metrics: Metrics,
        policy: RefreshPolicy,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self.policy = policy
        self.clock = clock

    async def rejected(self, grant: Grant, err: ProviderRejected, trigger: str) -> Grant:
        """The provider refused the refresh token. If a newer record was stored meanwhile
        (another replica rotated it), that one is the truth: it is returned, not marked."""
        written = await self._record_failure(grant, err.reason, final=True)
        if written is False:
            current = await self._store.read(grant.provider, grant.user_id)
            if current is not None and current.state != "reauth_required":
                log.warning(
                    "refresh.rejected_stale_token", provider=grant.provider, user_id=grant.user_id
                )
                return current
        log.warning(
            "grant.reauth_required",
            provider=grant.provider,
            user_id=grant.user_id,
            reason=err.reason,
            trigger=trigger,
        )
        raise ReauthRequired(f"the provider rejected the refresh token ({err.reason})") from err

    async def transient(self, grant: Grant, err: ProviderUnavailable, trigger: str) -> Grant:
        failed = self.failed(grant, err.reason, retry_after=err.retry_after)
        written = await self._write_failure(failed, grant.version)
        log.warning(
            "refresh.failed",
            provider=grant.provider,
            user_id=grant.user_id,
            reason=err.reason,
            failures=failed.consecutive_failures,
            trigger=trigger,
        )
        if written is False:
            current = await self._store.read(grant.provider, grant.user_id)
            if current is not None and current.state != "reauth_required":
                failed = current  # a newer record: its token may be fresh
        if failed.valid_for(self.clock()) > 0:
            return failed
        raise UpstreamUnavailable(
            f"the provider could not refresh the token ({err.reason})",
            retry_after=math.ceil(err.retry_after or 1),
        ) from err

    async def rotated(
        self, grant: Grant, err: ProviderUnavailable, trigger: str, issued: IssuedWriter
    ) -> Grant:
        """An unusable answer that still carried a new refresh token: the provider may have
        spent the one presented, so the failure is recorded on a grant holding the new one,
        written like any rotation (retried through ``rotated_write_window``): the new token is
        not lost and the old one is never presented again."""
        assert err.rotated_refresh_token is not None
        kept = replace(
            grant,
            refresh_token=err.rotated_refresh_token,
            refresh_token_issued_at=self.clock(),
        )
        failed = self.failed(kept, err.reason, retry_after=err.retry_after)
        outcome = await issued.write(failed, grant.version)
        log.warning(
            "refresh.rotated_in_unusable_answer",
            provider=grant.provider,
            user_id=grant.user_id,
            reason=err.reason,
            trigger=trigger,
            stored=outcome,
        )
        if outcome == "written" and failed.valid_for(self.clock()) > 0:
            return failed
        raise UpstreamUnavailable(
            f"the provider could not refresh the token ({err.reason})",
            retry_after=math.ceil(err.retry_after or 1),
        ) from err

    async def circuit_open(self, grant: Grant, breaker: CircuitBreaker, trigger: str) -> Grant:
        """No call while the provider's circuit is open. A grant whose token has expired is
        marked ``refresh_failing`` at once, so status and metrics tell the truth; it is tried
        again at the next probe (``expedite`` then makes it due at once)."""
        now = self.clock()
        self._metrics.refreshes.labels(grant.provider, "circuit_open", trigger).inc()
        if grant.valid_for(now) > 0:
            return grant
        if grant.state != "refresh_failing":
            reason = breaker.last_reason or "circuit_open"
            failed = self.failed(grant, reason, retry_after=breaker.retry_after())
            if await self._write_failure(failed, grant.version):
                grant = failed
        raise UpstreamUnavailable(
            "the provider is failing; calls to it are paused",
            retry_after=math.ceil(breaker.retry_after()),
        )

    def failed(self, grant: Grant, reason: str, *, retry_after: float | None) -> Grant:
        """The grant after a transient failure, retried after a backoff, but no later than its
        access token's expiry while it has one: the attempt then tells whether it still works
        (and the state turns ``refresh_failing`` if not)."""
        now = self.clock()
        retry_at = now + self.policy.retry_delay(grant.consecutive_failures + 1, retry_after)
        expires = grant.access_expires_at
        if expires is not None and now < expires < retry_at:
            retry_at = max(expires, now + (retry_after or 0.0))
        return grant.with_failure(
            reason,
            now,
            final=False,
            failing_after=self.policy.failures_before_failing,
            retry_at=retry_at,
        )

    async def _record_failure(self, grant: Grant, reason: str, *, final: bool) -> bool | None:
        failed = grant.with_failure(
            reason,
            self.clock(),
            final=final,
            failing_after=self.policy.failures_before_failing,
            retry_at=None,
        )
        return await self._write_failure(failed, grant.version)

    async def _write_failure(self, failed: Grant, expected_version: int) -> bool | None:
        """Mark a failure on the stored grant; False if a newer record is there, None if Redis
        is unreachable (best effort: the caller's answer does not depend on it)."""
        try:
            return await self._store.write(failed, expected_version)
        except StoreUnavailable:
            log.warning(
                "refresh.failure_not_recorded",
                provider=failed.provider,
                user_id=failed.user_id,
                reason=failed.last_error,
            )
            return None
