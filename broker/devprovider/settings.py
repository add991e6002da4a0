"""The dev provider's switches, and the records it keeps of what it issued and was asked."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

FailureKind = Literal[
    "invalid_grant",
    "invalid_client",
    "server_error",
    "rate_limited",
    "garbage",
    "no_access_token",
    "slow",
]
ClientAuth = Literal["client_secret_basic", "client_secret_post"]


@dataclass
class DevProviderSettings:
    """Switches tests flip at run time: every request reads them afresh."""

    client_id: str = "broker-dev"
    client_secret: str = "dev-secret-change-me"
    client_auth: ClientAuth = "client_secret_basic"
    access_token_ttl: int = 3600  # seconds
    rotate_refresh_tokens: bool = True  # a new RT on each refresh; the old one dies at once
    # a rotated-out RT presented again revokes its grant (RFC 9700 4.14.2); None: when rotating
    revoke_on_reuse: bool | None = None
    form_encoded: bool = False  # answer application/x-www-form-urlencoded, token_type "bearer"
    include_expires_in: bool = True
    include_scope: bool = True  # False: answers leave `scope` out (RFC 6749 5.1 allows it)
    # False: a code buys an access token alone, never a refresh token (Cloud 66, GitHub OAuth
    # apps; with form_encoded, include_expires_in and include_scope off: Cloud 66's answer)
    issue_refresh_tokens: bool = True
    scope: str = "public_api"  # scope granted when none is asked for
    require_pkce: bool = True  # /authorize rejects requests without a code_challenge
    code_ttl: int = 600  # seconds; codes are also single use
    deny_consent: bool = False  # /authorize redirects back with error=access_denied
    # a code buys a refresh token only when this scope was asked for (Adobe IMS: offline_access)
    offline_scope: str | None = None
    # the user consents to only these of the scopes asked for (a narrower grant); None: all
    grantable_scopes: tuple[str, ...] | None = None
    client_credentials: bool = True  # the client-credentials grant (RFC 6749 4.4) is offered
    client_token_ttl: int | None = None  # its access tokens' lifetime; None: access_token_ttl

    @property
    def reuse_revokes(self) -> bool:
        """Whether a reuse revokes the grant now: ``revoke_on_reuse``, else whether rotating."""
        if self.revoke_on_reuse is None:
            return self.rotate_refresh_tokens
        return self.revoke_on_reuse


@dataclass(frozen=True)
class RevocationRecord:
    """One call to /revoke, as the broker made it."""

    token: str
    token_type_hint: str | None
    authenticated: bool


@dataclass(frozen=True)
class _Failure:
    kind: FailureKind
    retry_after: int | None
    delay: float


@dataclass
class _Grant:
    """One authorization: its rotation chain of refresh tokens dies with it on revocation."""

    subject: str
    scope: str
    refresh_token: str = ""  # the live one; earlier ones are rotated out
    revoked: bool = False


@dataclass
class _AccessToken:
    grant: _Grant
    expires_at: float
    revoked: bool = False
    issued_at: float = field(default_factory=time.time)

    @property
    def live(self) -> bool:
        return not (self.revoked or self.grant.revoked)


@dataclass
class _Code:
    subject: str
    scope: str
    redirect_uri: str
    challenge: str | None
    expires_at: float
    used: bool = False
    grant: _Grant | None = field(default=None)  # what it bought: revoked if the code is replayed
