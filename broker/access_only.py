"""Grants that hold an access token alone: the provider issued no refresh token (Cloud 66,
GitHub OAuth apps).

Nothing can make such a token last longer, so it is served as it is while it is valid, whatever
``min_ttl`` asked, and never taken to the provider's token endpoint. When its stated expiry has
passed, or a resource server refused it, a user must authorize again: the grant turns
``reauth_required`` through the ordinary fenced write, so whatever watches state changes at the
store sees it, and a newer record (the user reconnected meanwhile) is never overwritten.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from broker.errors import ReauthRequired, StoreUnavailable, UpstreamUnavailable
from broker.models import Grant, holds
from broker.store import GrantStore

log = structlog.get_logger(__name__)

ATTEMPTS = 3  # records replaced under us in a row before giving up for now


class AccessOnlyGrants:
    def __init__(self, store: GrantStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    async def serve(self, grant: Grant) -> Grant:
        """``grant`` while its access token is valid; once it has expired, the grant is
        marked ``reauth_required`` and ReauthRequired raised. A newer record found while
        marking is served by the same rule (or returned as is if it can be refreshed)."""
        for _ in range(ATTEMPTS):
            if grant.refreshable or grant.valid_for(self._clock()) > 0:
                return grant
            grant = await self.end(grant, "access_token_expired")
        raise UpstreamUnavailable("the grant kept changing; retry")

    async def rejected(self, grant: Grant, rejected: str) -> Grant:
        """A resource server refused ``rejected``: if ``grant`` holds it, nothing can replace
        it and the grant ends (see :meth:`end`). Returns a record not holding it."""
        for _ in range(ATTEMPTS):
            if grant.refreshable or not holds(grant, rejected):
                return grant
            grant = await self.end(grant, "access_token_rejected")
        raise UpstreamUnavailable("the rejected access token could not be replaced now")

    async def end(self, grant: Grant, reason: str) -> Grant:
        """Mark ``grant`` ``reauth_required`` for ``reason`` and raise ReauthRequired, or return
        the newer record that is stored instead (unless that one is marked already)."""
        marked = grant.expired_for_good(reason, self._clock())
        try:
            written: bool | None = await self._store.write(marked, grant.version)
        except StoreUnavailable:
            # The answer does not depend on it: the next read finds the same expired token.
            log.warning("grant.reauth_not_recorded", provider=grant.provider, user_id=grant.user_id)
            written = None
        if written is False:
            current = await self._store.read(grant.provider, grant.user_id)
            if current is not None and current.state != "reauth_required":
                return current
        if written:
            log.warning(
                "grant.reauth_required",
                provider=grant.provider,
                user_id=grant.user_id,
                reason=reason,
            )
        raise ReauthRequired(
            f"the user must authorize {grant.provider!r} again: the access token, which cannot "
            f"be refreshed, {'was refused' if reason == 'access_token_rejected' else 'expired'}"
        )
