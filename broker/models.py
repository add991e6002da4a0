"""Grants, token sets, timestamps and the refresh-timing rule.

A :class:`Grant` is immutable; every change makes a new one with ``version + 1`` so a write can
be fenced against the version it was derived from.
"""

from __future__ import annotations

import hmac
import math
import random
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from broker.errors import InvalidRequest

GrantState = Literal["active", "refresh_failing", "reauth_required"]
MAX_USER_ID_BYTES = 256
MAX_TOKEN_CHARS = 16 * 1024
MAX_SCOPE_CHARS = 4 * 1024
MAX_EXPIRES_IN = 366 * 86400  # the longest access-token lifetime an import may state
# Unicode categories Cc (C0, DEL, C1) and Cs (lone surrogates): one regex scan, not a
# unicodedata lookup per character (tests/test_models.py checks it against unicodedata).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def validate_user_id(user_id: str) -> str:
    """Return ``user_id`` if it is 1..256 bytes of UTF-8 without control characters."""
    size = len(user_id.encode("utf-8", errors="surrogatepass"))
    if not 1 <= size <= MAX_USER_ID_BYTES:
        raise InvalidRequest(f"user id must be 1 to {MAX_USER_ID_BYTES} bytes of UTF-8")
    if _CONTROL.search(user_id):
        raise InvalidRequest("user id must not contain control characters")
    return user_id


def iso(ts: float | None) -> str | None:
    """RFC 3339 UTC with a ``Z``, to the second, as the API shows times."""
    if ts is None:
        return None
    return _iso_second(int(ts))


@lru_cache(maxsize=4096)  # every token answer shows its expiry: the same few seconds, often
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_ms(ts: float) -> str:
    """RFC 3339 UTC with a ``Z``, to the millisecond, as events show times."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def refresh_due_at(
    expires_at: float,
    lifetime: float,
    *,
    lead: float,
    jitter_max: float,
    rng: random.Random | None = None,
) -> float:
    """When to refresh a token: ``expires_at - min(lead, L/2) - U[0, min(jitter_max, L/10)]``.

    The L/2 and L/10 caps keep short-lived tokens from being refreshed more often than once per
    half lifetime, and the jitter spreads grants imported together.
    """
    lifetime = max(lifetime, 0.0)
    jitter = (rng or random).uniform(0.0, min(jitter_max, lifetime / 10))
    return expires_at - min(lead, lifetime / 2) - jitter


@dataclass(frozen=True, slots=True)
class TokenSet:
    """A provider's successful token answer, normalised (``expires_in`` always set: the
    provider's ``default_expires_in`` when ``expires_stated`` is False)."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None
    expires_stated: bool = True


@dataclass(frozen=True, slots=True)
class Grant:
    """What the broker holds for one (provider, user id)."""

    provider: str
    user_id: str
    refresh_token: str | None = field(repr=False)  # None: the provider issued none
    access_token: str | None = field(default=None, repr=False)
    token_type: str = "Bearer"
    access_expires_at: float | None = None
    access_issued_at: float | None = None
    scope: str | None = None
    state: GrantState = "active"
    next_refresh_at: float | None = None
    last_refreshed_at: float | None = None
    refresh_count: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    refresh_token_issued_at: float | None = None
    refresh_token_expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0

    @property
    def refreshable(self) -> bool:
        """False for a grant holding an access token alone (the provider issued no refresh
        token): it is served until its stated expiry, never refreshed."""
        return self.refresh_token is not None

    def valid_for(self, now: float) -> float:
        """Seconds the held access token stays valid (negative or 0 when there is none;
        infinite for a token without a stated expiry, which only a grant that cannot be
        refreshed holds)."""
        if self.access_token is None:
            return 0.0
        if self.access_expires_at is None:
            return math.inf if not self.refreshable else 0.0
        return self.access_expires_at - now

    def lifetime(self) -> float | None:
        """The full lifetime of a token we got from the provider; None for imported tokens,
        whose age is unknown."""
        if self.access_expires_at is None or self.access_issued_at is None:
            return None
        return self.access_expires_at - self.access_issued_at

    def with_tokens(
        self, tokens: TokenSet, now: float, *, next_refresh_at: float, refreshed: bool
    ) -> Grant:
        """The grant after the provider issued ``tokens``; a missing refresh token keeps ours.
        The provider's default lifetime applies only to a grant that can be refreshed: an
        access token alone with no stated expiry is held without one."""
        rotated = tokens.refresh_token is not None and tokens.refresh_token != self.refresh_token
        refresh_token = tokens.refresh_token or self.refresh_token
        expires = tokens.expires_stated or refresh_token is not None
        issued = now if rotated else self.refresh_token_issued_at or now
        return replace(
            self,
            refresh_token=refresh_token,
            access_token=tokens.access_token,
            token_type=tokens.token_type,
            access_expires_at=now + tokens.expires_in if expires else None,
            access_issued_at=now if refreshed else None,
            scope=tokens.scope if tokens.scope is not None else self.scope,
            state="active",
            next_refresh_at=next_refresh_at,
            last_refreshed_at=now if refreshed else self.last_refreshed_at,
            refresh_count=self.refresh_count + (1 if refreshed else 0),
            consecutive_failures=0,
            last_error=None,
            refresh_token_issued_at=issued if refresh_token is not None else None,
            updated_at=now,
            version=self.version + 1,
        )

    def with_failure(
        self, reason: str, now: float, *, final: bool, failing_after: int, retry_at: float | None
    ) -> Grant:
        """The grant after a failed refresh, to be retried at ``retry_at`` unless ``final``; it
        is never dropped, only marked. It is ``refresh_failing`` after ``failing_after``
        failures in a row, or at once when its access token has expired: nothing valid is
        left to serve."""
        failures = self.consecutive_failures + 1
        state: GrantState
        if final:
            state = "reauth_required"
        elif failures >= failing_after or self.valid_for(now) <= 0:
            state = "refresh_failing"
        else:
            state = self.state
        return replace(
            self,
            state=state,
            consecutive_failures=failures,
            last_error=reason,
            next_refresh_at=None if final else retry_at,
            updated_at=now,
            version=self.version + 1,
        )

    def expired_for_good(self, reason: str, now: float) -> Grant:
        """A grant that cannot be refreshed, once its access token expired or was refused: a
        user must authorize again. Not a failed refresh: no failure is counted."""
        return replace(
            self,
            state="reauth_required",
            last_error=reason,
            next_refresh_at=None,
            updated_at=now,
            version=self.version + 1,
        )

    def status(self) -> dict[str, Any]:
        """The public status document; never a secret. A grant without a refresh token is
        indexed at its access token's expiry (to be marked then), but never refreshed: its
        ``next_refresh_at`` is null."""
        return {
            "provider": self.provider,
            "user_id": self.user_id,
            "state": self.state,
            "scope": self.scope,
            "has_refresh_token": self.refreshable,
            "access_expires_at": iso(self.access_expires_at),
            "next_refresh_at": iso(self.next_refresh_at) if self.refreshable else None,
            "last_refreshed_at": iso(self.last_refreshed_at),
            "refresh_count": self.refresh_count,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "refresh_token_issued_at": iso(self.refresh_token_issued_at),
            "refresh_token_expires_at": iso(self.refresh_token_expires_at),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


def holds(grant: Grant, access_token: str) -> bool:
    """Whether ``grant`` holds this access token, compared in constant time (surrogates a
    provider escaped in a token are compared as they came)."""
    if grant.access_token is None:
        return False
    return hmac.compare_digest(
        grant.access_token.encode("utf-8", "surrogatepass"),
        access_token.encode("utf-8", "surrogatepass"),
    )
