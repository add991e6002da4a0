"""Grant lifecycle: import, status and revoke-and-delete.

Imports and deletes take the same per-grant lock as refreshes, so they never interleave with a
refresh that is spending the refresh token they replace or revoke.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from broker.config import ProviderSettings
from broker.errors import (
    GrantNotFound,
    GrantUnreadable,
    InvalidRefreshToken,
    InvalidRequest,
    ProviderRejected,
    ProviderUnavailable,
    StoreUnavailable,
    UpstreamUnavailable,
)
from broker.locks import GrantLocks
from broker.metrics import Metrics
from broker.models import MAX_EXPIRES_IN, Grant, TokenSet
from broker.oauth import OAuthClient
from broker.providers import ProviderRegistry
from broker.refresh import Refresher
from broker.store import GrantStore

log = structlog.get_logger(__name__)

RevocationResult = Literal["revoked", "failed", "not_supported", "skipped"]


@dataclass(frozen=True, slots=True)
class GrantImport:
    """A validated import request body."""

    refresh_token: str | None = field(repr=False)  # None: an access token alone
    access_token: str | None = field(default=None, repr=False)
    expires_in: int | None = None
    scope: str | None = None
    expires_at: float | None = None  # instead of expires_in: Unix time


class GrantService:
    def __init__(
        self,
        store: GrantStore,
        providers: ProviderRegistry,
        locks: GrantLocks,
        oauth: OAuthClient,
        refresher: Refresher,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._providers = providers
        self._locks = locks
        self._oauth = oauth
        self._refresher = refresher
        self._metrics = metrics
        self._clock = clock

    async def import_grant(
        self, provider: str, user_id: str, body: GrantImport
    ) -> tuple[Grant, bool]:
        """Store a grant (replacing any), validating the refresh token at the provider when no
        access token comes with it; an access token alone makes a grant that is never
        refreshed. Returns the grant and whether it is new. Nothing is stored when validation
        fails."""
        settings = self._providers.get(provider)
        if body.refresh_token is None and settings.require_refresh_token:
            raise InvalidRequest(
                f"provider {provider!r} requires a refresh token (require_refresh_token)"
            )
        async with self._locks.holding(provider, user_id) as held:
            version = await self._store.version(provider, user_id)
            base_version = await self._store.base_version(version)
            now = self._clock()
            if body.access_token is not None:
                expires_in = body.expires_in
                if body.expires_at is not None:
                    expires_in = _seconds_until(body.expires_at, now)
                tokens = TokenSet(
                    access_token=body.access_token,
                    token_type="Bearer",
                    expires_in=expires_in or settings.default_expires_in,
                    scope=body.scope,
                    expires_stated=expires_in is not None,
                )
            else:
                assert body.refresh_token is not None  # the body's rule: one of the two
                # Validating spends the imported refresh token: the lock must stay ours
                # through the call and the write of what it returns.
                await self._locks.ensure(held, self._refresher.policy.call_budget)
                tokens = await self._validate(settings.name, body.refresh_token)
            base = Grant(
                provider=provider,
                user_id=user_id,
                refresh_token=body.refresh_token,
                scope=body.scope,
                created_at=now,
                updated_at=now,
                version=base_version,
                refresh_token_issued_at=now if body.refresh_token is not None else None,
            )
            grant = self._refresher.with_tokens(
                base, tokens, refreshed=body.access_token is None, requested_at=now
            )
            outcome = await self._refresher.issued.write(grant, version)
            if outcome == "lost":
                raise StoreUnavailable("the grant could not be stored; Redis is unreachable")
            if outcome == "conflict":
                raise UpstreamUnavailable("the grant changed during the import; retry")
        log.info(
            "grant.imported",
            provider=provider,
            user_id=user_id,
            replaced=version != 0,
            has_refresh_token=grant.refreshable,
        )
        return grant, version == 0

    async def _validate(self, provider: str, refresh_token: str) -> TokenSet:
        settings = self._providers.get(provider)
        try:
            return await self._oauth.refresh(settings, refresh_token)
        except ProviderRejected as err:
            self._metrics.refreshes.labels(provider, "rejected", "import").inc()
            raise InvalidRefreshToken(
                f"the provider rejected the refresh token ({err.reason})"
            ) from err
        except ProviderUnavailable as err:
            self._metrics.refreshes.labels(provider, "transient", "import").inc()
            raise UpstreamUnavailable(
                f"the provider could not validate the refresh token ({err.reason})",
                retry_after=int(err.retry_after or 1),
            ) from err

    async def status(self, provider: str, user_id: str) -> Grant:
        self._providers.get(provider)
        grant = await self._store.read(provider, user_id)
        if grant is None:
            raise GrantNotFound(f"no grant for this user at {provider!r}")
        return grant

    async def delete(self, provider: str, user_id: str) -> RevocationResult:
        """Revoke at the provider (best effort) and delete; an unreadable record is deleted
        without revocation so operators can clear it."""
        settings = self._providers.get(provider)
        async with self._locks.holding(provider, user_id):
            try:
                grant = await self._store.read(provider, user_id)
            except GrantUnreadable:
                grant = None
                outcome: RevocationResult = "skipped"
            else:
                if grant is None:
                    raise GrantNotFound(f"no grant for this user at {provider!r}")
                outcome = await self._revoke(settings, grant)
            if not await self._store.delete(provider, user_id):
                raise GrantNotFound(f"no grant for this user at {provider!r}")
        self._metrics.revocations.labels(provider, outcome).inc()
        log.info("grant.deleted", provider=provider, user_id=user_id, revocation=outcome)
        return outcome

    async def _revoke(self, settings: ProviderSettings, grant: Grant) -> RevocationResult:
        """The refresh token, or for a grant without one its access token (RFC 7009 hints)."""
        if grant.refresh_token is not None:
            return await self._oauth.revoke(settings, grant.refresh_token)
        if grant.access_token is None:
            return "skipped"
        return await self._oauth.revoke(settings, grant.access_token, "access_token")


def _seconds_until(expires_at: float, now: float) -> int:
    """An imported ``expires_at`` as seconds from now: it must be in the future, and no
    further than an ``expires_in`` may be."""
    seconds = math.ceil(expires_at - now)
    if not 1 <= seconds <= MAX_EXPIRES_IN:
        raise InvalidRequest(
            f"expires_at must be in the future, at most {MAX_EXPIRES_IN // 86400} days from now"
        )
    return seconds
