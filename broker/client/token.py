"""The token the broker hands out, as a frozen value whose ``repr`` never shows the secret."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Token", "token_from_body"]


@dataclass(frozen=True, slots=True)
class Token:
    """An access token for one (provider, user id), or for a provider's own client.

    ``expires_at`` is an aware UTC ``datetime`` (None: the provider stated no expiry, the token
    is valid until revoked). ``expires_in`` is the broker's count of seconds left *when it
    answered*; a token served from the client's cache keeps that figure, so use
    ``expires_at`` or ``seconds_left()`` to know how long it still lasts.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: datetime | None
    expires_in: int | None
    scope: str | None

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value for the provider's API (RFC 6750)."""
        kind = "Bearer" if self.token_type.lower() == "bearer" else self.token_type
        return f"{kind} {self.access_token}"

    def seconds_left(self) -> float | None:
        """Seconds until ``expires_at`` on this machine's wall clock (None: no expiry)."""
        if self.expires_at is None:
            return None
        return self.expires_at.timestamp() - time.time()


def token_from_body(body: Any) -> Token:
    """A Token from the broker's JSON answer; ValueError when it is not one."""
    if not isinstance(body, dict):
        raise ValueError("the answer is not a JSON object")
    access, kind = body.get("access_token"), body.get("token_type", "Bearer")
    expires_at, expires_in, scope = (
        body.get("expires_at"),
        body.get("expires_in"),
        body.get("scope"),
    )
    if not isinstance(access, str) or not access or not isinstance(kind, str):
        raise ValueError("the answer holds no access_token")
    if expires_in is not None and (not isinstance(expires_in, int) or isinstance(expires_in, bool)):
        raise ValueError("expires_in is not an integer")
    if scope is not None and not isinstance(scope, str):
        raise ValueError("scope is not a string")
    when = None
    if expires_at is not None:
        if not isinstance(expires_at, str):
            raise ValueError("expires_at is not a string")
        when = datetime.fromisoformat(expires_at)  # RFC 3339 with Z: Python 3.11 reads it
        if when.tzinfo is None:
            raise ValueError("expires_at has no time zone")
    return Token(access, kind, when, expires_in, scope)
