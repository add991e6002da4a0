"""One client-credentials request for an app token, made while its lock is held
(``broker/apptokens.py`` takes the lock and shares the result): the provider's circuit, the call,
the write of what it issued, and a failure recorded on the record without losing its token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

import structlog

from broker.app_store import AppToken, AppTokenStore, Stored, issued, scope_id
from broker.errors import (
    InvalidRequest,
    ProviderRejected,
    ProviderUnavailable,
    StoreUnavailable,
    UpstreamUnavailable,
)
from broker.locks import GrantLocks, HeldLock
from broker.metrics import Metrics
from broker.models import refresh_due_at
from broker.oauth import OAuthClient
from broker.policy import RefreshPolicy
from broker.providers import ProviderRegistry

log = structlog.get_logger("broker.apptokens")  # the lines' logger before they moved here

Trigger = Literal["on_demand", "scheduled"]


def still_valid(stored: Stored, now: float) -> AppToken | None:
    token = stored.token
    return token if token is not None and token.valid_for(now) > 0 else None


class AppTokenRequests:
    def __init__(
        self,
        store: AppTokenStore,
        locks: GrantLocks,
        oauth: OAuthClient,
        providers: ProviderRegistry,
        metrics: Metrics,
        policy: RefreshPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._locks = locks
        self._oauth = oauth
        self._providers = providers
        self._metrics = metrics
        self._policy = policy
        self._clock = clock

    async def run(
        self, provider: str, scope: str, stored: Stored, held: HeldLock, trigger: Trigger
    ) -> AppToken:
        settings = self._providers.get(provider)
        breaker = self._providers.breaker(provider)
        held.stage = "ensure"
        await self._locks.ensure(held, self._policy.call_budget)
        if not breaker.allow():
            self._count(provider, "circuit_open", trigger)
            if (valid := still_valid(stored, self._clock())) is not None:
                return valid
            raise UpstreamUnavailable(
                "the provider is failing; calls to it are paused",
                retry_after=math.ceil(breaker.retry_after()),
            )
        requested_at = self._clock()
        held.stage = "provider_call"
        try:
            tokens = await self._oauth.client_credentials(settings, scope)
        except ProviderRejected as err:
            breaker.record_success()
            self._count(provider, "rejected", trigger)
            return await self._failed(provider, scope, stored, err, trigger)
        except ProviderUnavailable as err:
            if err.reason == "invalid_scope":
                breaker.record_success()  # the provider is up; the scope is the problem
            else:
                breaker.record_failure(err.reason)
            self._count(provider, "transient", trigger)
            return await self._failed(provider, scope, stored, err, trigger)
        except BaseException:
            breaker.release_probe()
            raise
        breaker.record_success()
        self._count(provider, "success", trigger)
        lifetime = tokens.expires_in
        due = refresh_due_at(
            requested_at + lifetime,
            lifetime,
            lead=self._policy.lead,
            jitter_max=self._policy.jitter_max,
        )
        new = issued(provider, scope, tokens, stored, requested_at=requested_at, due=due)
        held.stage = "write"
        try:
            written: bool | None = await self._store.write(new, stored.version)
        except StoreUnavailable:
            written = None  # the caller still gets the token: it is valid
        log.info(
            "app_token.issued",
            provider=provider,
            scope=scope,
            expires_in=lifetime,
            trigger=trigger,
            stored={True: "written", False: "conflict", None: "failed"}[written],
        )
        return new

    async def _failed(
        self,
        provider: str,
        scope: str,
        stored: Stored,
        err: ProviderRejected | ProviderUnavailable,
        trigger: Trigger,
    ) -> AppToken:
        """Record the failure on the record (its token kept), retried after a backoff but no
        later than the token's expiry; the token if it is still valid, else the error."""
        now = self._clock()
        retry_after = err.retry_after if isinstance(err, ProviderUnavailable) else None
        log.warning(
            "app_token.request_failed", provider=provider, reason=err.reason, trigger=trigger
        )
        token = stored.token
        if token is not None:
            retry_at = now + self._policy.retry_delay(token.consecutive_failures + 1, retry_after)
            if now < token.access_expires_at < retry_at:
                retry_at = max(token.access_expires_at, now + (retry_after or 0.0))
            limit = self._policy.failures_before_failing
            token = token.with_failure(err.reason, now, retry_at=retry_at, failing_after=limit)
            try:
                if not await self._store.write(token, stored.version):
                    token = (await self._store.read(provider, scope_id(token.scope))).token or token
            except StoreUnavailable:
                log.warning("app_token.failure_not_recorded", provider=provider)
            if token.valid_for(now) > 0:
                return token  # a newer record's, or ours: still valid, with the failure noted
        if err.reason == "invalid_scope":
            raise InvalidRequest("the provider refused this scope (invalid_scope)") from err
        raise UpstreamUnavailable(
            f"the provider could not issue an app token ({err.reason})",
            retry_after=math.ceil(retry_after or 1),
        ) from err

    def _count(self, provider: str, outcome: str, trigger: Trigger) -> None:
        self._metrics.app_token_requests.labels(provider, outcome, trigger).inc()
