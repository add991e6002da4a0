"""The authorization-code flow (RFC 6749 §4.1 with PKCE, RFC 7636): start it, complete it.

Starting makes a 256-bit random ``state`` and, unless the provider turns PKCE off, an S256
verifier. The pending authorization (provider, user id, scope, ``redirect_after``, verifier) is
stored under the SHA-256 of the state, encrypted with the key ring and bound to its key, and
expires after ``authorization_ttl``: neither the state nor the verifier is ever stored or logged
in clear.

Completing takes the pending authorization (read and delete in one step), so of two callbacks
carrying one state only the first gets anything; a missing, unknown, expired or used state raises
:class:`InvalidState` before any code is exchanged. The provider's ``error=access_denied`` ends
as ``denied``; a code is exchanged with the provider's client authentication and the verifier,
and the tokens are stored the way an import stores them: under the grant's lock, replacing any
grant of that user (reconnecting after ``reauth_required`` is the main use), fenced on the
version read, scheduled for refresh. An answer without a refresh token (Cloud 66, GitHub OAuth
apps) stores the access token alone, never refreshed (``broker/access_only.py``), unless the
provider has ``require_refresh_token``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

from broker.authorization_states import AuthorizationStates, PendingAuthorization
from broker.config import ProviderSettings, Settings
from broker.crypto import KeyRing
from broker.errors import (
    BrokerError,
    InvalidRequest,
    ProviderError,
    StoreUnavailable,
    UpstreamUnavailable,
)
from broker.locks import GrantLocks
from broker.metrics import Metrics
from broker.models import MAX_SCOPE_CHARS, Grant, TokenSet, validate_user_id
from broker.oauth import ERROR_CODE, OAuthClient
from broker.pending import PendingAuthorizations
from broker.providers import ProviderRegistry
from broker.redirects import check_redirect, with_params
from broker.refresh import Refresher
from broker.store import GrantStore

log = structlog.get_logger(__name__)

STATE_BYTES = 32
VERIFIER_BYTES = 32  # 43 base64url characters; RFC 7636 wants 43 to 128
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token
GRANT_WRITE_ATTEMPTS = 3
GRANT_WRITE_BACKOFF = 0.1

Outcome = Literal["connected", "denied", "error"]


@dataclass(frozen=True, slots=True)
class StartedAuthorization:
    """Where to send the user's browser; the URL and the state are secrets until used."""

    authorization_url: str = field(repr=False)
    state: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True, slots=True)
class CallbackResult:
    """How a callback ended and where the user's browser goes now."""

    outcome: Outcome
    location: str
    error: str | None = None  # a short code when outcome == "error"
    grant: Grant | None = None
    user_id: str = ""
    client: str | None = None  # the client that started the authorization
    replaced: bool = False


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of ``verifier`` (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode()


class AuthorizationService:
    """Starts authorizations and completes them into stored grants."""

    def __init__(
        self,
        store: GrantStore,
        pending: PendingAuthorizations,
        providers: ProviderRegistry,
        locks: GrantLocks,
        keyring: KeyRing,
        oauth: OAuthClient,
        refresher: Refresher,
        metrics: Metrics,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._states = AuthorizationStates(pending, store.keys, keyring, metrics, clock)
        self._providers = providers
        self._locks = locks
        self._oauth = oauth
        self._refresher = refresher
        self._metrics = metrics
        self._settings = settings
        self._clock = clock

    async def start(
        self,
        provider: str,
        user_id: str,
        redirect_after: str,
        scope: str | None,
        client: str | None = None,
    ) -> StartedAuthorization:
        """A stored pending authorization and the provider URL to send the user to; nothing is
        stored when an argument is refused."""
        settings = self._providers.get(provider)
        if not settings.authorize_url:
            raise InvalidRequest(
                f"provider {provider!r} has no authorize_url: it cannot start authorizations"
            )
        validate_user_id(user_id)
        check_redirect(
            redirect_after, (*self._settings.redirect_allowlist, *settings.redirect_allowlist)
        )
        requested = _requested_scope(scope, settings)
        state = secrets.token_urlsafe(STATE_BYTES)
        verifier = secrets.token_urlsafe(VERIFIER_BYTES) if settings.pkce else None
        now = self._clock()
        ttl = self._settings.authorization_ttl
        pending = PendingAuthorization(
            provider=provider,
            user_id=user_id,
            scope=requested,
            redirect_after=redirect_after,
            code_verifier=verifier,
            created_at=now,
            expires_at=now + ttl,
            client=client,
        )
        await self._states.save(state, pending, ttl)
        self._metrics.authorizations.labels(provider, "started").inc()
        log.info(
            "authorization.started",
            provider=provider,
            user_id=user_id,
            scope=requested,
            pkce=verifier is not None,
        )
        redirect_uri = self._settings.callback_url(settings.name)
        url = _authorization_url(settings, redirect_uri, state, requested, verifier)
        return StartedAuthorization(url, state, pending.expires_at)

    async def complete(self, provider: str, query: Mapping[str, str]) -> CallbackResult:
        """The end of the flow for a callback's query. InvalidState (nothing exchanged) when
        the state is missing, unknown, expired, used or another provider's."""
        settings = self._providers.get(provider)
        pending = await self._states.take(provider, query.get("state", ""))
        error = query.get("error")
        if error is not None:
            if error == "access_denied":
                return self._end(pending, "denied")
            reason = error if ERROR_CODE.match(error) else "provider_error"
            return self._end(pending, "error", reason)
        code = query.get("code")
        if not code:
            return self._end(pending, "error", "missing_code")
        requested_at = self._clock()
        try:
            tokens = await self._oauth.exchange_code(
                settings, code, self._settings.callback_url(provider), pending.code_verifier
            )
        except ProviderError as err:
            return self._end(pending, "error", err.reason)
        if tokens.refresh_token is None and settings.require_refresh_token:
            return self._end(pending, "error", "no_refresh_token")
        try:
            grant, replaced = await self._store_grant(pending, tokens, requested_at)
        except BrokerError as err:
            return self._end(pending, "error", err.code)
        if tokens.scope is not None and set(tokens.scope.split()) != set(pending.scope.split()):
            log.info(
                "authorization.scope_differs",
                provider=provider,
                user_id=pending.user_id,
                requested=pending.scope,
                granted=tokens.scope,
            )
        return self._end(pending, "connected", grant=grant, replaced=replaced)

    async def _store_grant(
        self, pending: PendingAuthorization, tokens: TokenSet, requested_at: float
    ) -> tuple[Grant, bool]:
        """Store the new grant in place of any other for this user, like an import. The user
        just consented and the code is spent: a passing Redis error is retried briefly."""
        provider, user_id = pending.provider, pending.user_id
        async with self._locks.holding(provider, user_id):
            for attempt in range(GRANT_WRITE_ATTEMPTS):
                try:
                    version = await self._store.version(provider, user_id)
                    base_version = await self._store.base_version(version)
                    now = self._clock()
                    base = Grant(
                        provider=provider,
                        user_id=user_id,
                        refresh_token=tokens.refresh_token,
                        scope=pending.scope or None,
                        created_at=now,
                        updated_at=now,
                        version=base_version,
                        refresh_token_issued_at=(
                            requested_at if tokens.refresh_token is not None else None
                        ),
                    )
                    grant = self._refresher.with_tokens(
                        base, tokens, refreshed=True, requested_at=requested_at
                    )
                    # issued by the provider just now (lifetime known), but not a refresh
                    grant = replace(grant, refresh_count=0, last_refreshed_at=None)
                    if await self._store.write(grant, version):
                        return grant, version != 0
                except StoreUnavailable:
                    if attempt == GRANT_WRITE_ATTEMPTS - 1:
                        raise
                await asyncio.sleep(GRANT_WRITE_BACKOFF * 2**attempt)
        raise UpstreamUnavailable("the grant kept changing while it was being stored")

    def _end(
        self,
        pending: PendingAuthorization,
        outcome: Outcome,
        error: str | None = None,
        *,
        grant: Grant | None = None,
        replaced: bool = False,
    ) -> CallbackResult:
        params: list[tuple[str, str]] = [("status", outcome)]
        if error is not None:
            params.append(("code", error))
        params.append(("provider", pending.provider))
        self._metrics.authorizations.labels(pending.provider, outcome).inc()
        (log.info if outcome != "error" else log.warning)(
            "authorization.completed",
            provider=pending.provider,
            user_id=pending.user_id,
            outcome=outcome,
            reason=error,
            replaced=replaced if grant is not None else None,
            scope=grant.scope if grant is not None else None,
        )
        return CallbackResult(
            outcome,
            with_params(pending.redirect_after, params),
            error,
            grant,
            user_id=pending.user_id,
            client=pending.client,
            replaced=replaced,
        )


def _authorization_url(
    settings: ProviderSettings, redirect_uri: str, state: str, scope: str, verifier: str | None
) -> str:
    """The provider's authorization URL with the flow's parameters after any it already has."""
    assert settings.authorize_url is not None
    params = [
        ("response_type", "code"),
        ("client_id", settings.client_id),
        ("redirect_uri", redirect_uri),
    ]
    if scope:
        params.append(("scope", scope))
    params.append(("state", state))
    if verifier is not None:
        params += [("code_challenge", pkce_challenge(verifier))]
        params += [("code_challenge_method", "S256")]
    parts = urlsplit(settings.authorize_url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _requested_scope(scope: str | None, settings: ProviderSettings) -> str:
    """The scope to ask for: the client's or the provider's default, plus the provider's
    required scopes, each once, in order."""
    if scope is None:
        scopes = list(settings.scopes)
    else:
        if len(scope) > MAX_SCOPE_CHARS:
            raise InvalidRequest(f"scope is longer than {MAX_SCOPE_CHARS} characters")
        scopes = scope.split(" ")
        if not all(SCOPE_TOKEN.fullmatch(s) for s in scopes):
            raise InvalidRequest(
                "scope must be scope names separated by single spaces (RFC 6749 §3.3); "
                "leave it out for the provider's default"
            )
    return " ".join(dict.fromkeys([*scopes, *settings.required_scopes]))
