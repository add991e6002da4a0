"""Grant lifecycle: import, status and revoke-and-delete.

Imports and deletes take the same per-grant lock as refreshes, so they never interleave with a
refresh that is spending the refresh token they replace or revoke.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from broker.errors import (
    GrantNotFound,
    GrantUnreadable,
    InvalidRefreshToken,
    ProviderRejected,
    ProviderUnavailable,
    StoreUnavailable,
    UpstreamUnavailable,
)
from broker.locks import GrantLocks
from broker.metrics import Metrics
from broker.models import Grant, TokenSet
from broker.oauth import OAuthClient
from broker.providers import ProviderRegistry
from broker.refresh import Refresher
from broker.store import GrantStore

log = structlog.get_logger(__name__)

RevocationResult = Literal["revoked", "failed", "not_supported", "skipped"]


@dataclass(frozen=True, slots=True)
class GrantImport:
    """A validated import request body."""

    refresh_token: str = field(repr=False)
    access_token: str | None = field(default=None, repr=False)
    expires_in: int | None = None
    scope: str | None = None


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
        access token comes with it. Returns the grant and whether it is new. Nothing is stored
        when validation fails."""
        settings = self._providers.get(provider)
        async with self._locks.holding(provider, user_id) as held:
            version = await self._store.version(provider, user_id)
            base_version = await self._store.base_version(version)
            now = self._clock()
            if body.access_token is not None:
                tokens = TokenSet(
                    access_token=body.access_token,
                    token_type="Bearer",
                    expires_in=body.expires_in or settings.default_expires_in,
                    scope=body.scope,
                )
            else:
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
                refresh_token_issued_at=now,
            )
            grant = self._refresher.with_tokens(
                base, tokens, refreshed=body.access_token is None, requested_at=now
            )
            outcome = await self._refresher.issued.write(grant, version)
            if outcome == "lost":
                raise StoreUnavailable("the grant could not be stored; Redis is unreachable")
            if outcome == "conflict":
                raise UpstreamUnavailable("the grant changed during the import; retry")
        log.info("grant.imported", provider=provider, user_id=user_id, replaced=version != 0)
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
                outcome = await self._oauth.revoke(settings, grant.refresh_token)
            if not await self._store.delete(provider, user_id):
                raise GrantNotFound(f"no grant for this user at {provider!r}")
        self._metrics.revocations.labels(provider, outcome).inc()
        log.info("grant.deleted", provider=provider, user_id=user_id, revocation=outcome)
        return outcome
