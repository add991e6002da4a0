"""The broker's exceptions.

Every error a client can see carries its HTTP ``status`` and stable problem ``code`` (RFC 9457),
so the HTTP layer maps them without knowing where they came from. Messages never contain a
token, key or secret: they are logged and returned as they are.

    BrokerError                      500 internal_error
    ├── InvalidRequest               400 invalid_request
    │   └── InvalidState             400 (the callback's HTML page: unknown/expired/used state)
    ├── Unauthenticated              401 unauthenticated
    ├── Forbidden                    403 forbidden
    ├── ProviderNotFound             404 provider_not_found
    ├── GrantNotFound                404 grant_not_found
    ├── AppTokenNotConfigured        404 app_token_not_configured
    ├── ReauthRequired               409 reauth_required
    ├── PayloadTooLarge              413 payload_too_large
    ├── InvalidRefreshToken          422 invalid_refresh_token
    ├── RateLimited                  429 rate_limited (with Retry-After)
    ├── GrantUnreadable              500 grant_unreadable
    └── Unavailable                  503 (with Retry-After)
        ├── UpstreamUnavailable      503 upstream_unavailable
        └── StoreUnavailable         503 store_unavailable

    ConfigError                      bad configuration; names the setting (start-up only)

    ProviderError                    a provider's token endpoint did not give us tokens
    ├── ProviderRejected             final: the grant is dead (e.g. invalid_grant)
    └── ProviderUnavailable          transient: try again later (5xx, 429, timeout, garbage)
"""

from __future__ import annotations

__all__ = [
    "AppTokenNotConfigured",
    "BrokerError",
    "ConfigError",
    "Forbidden",
    "GrantNotFound",
    "GrantUnreadable",
    "InvalidRefreshToken",
    "InvalidRequest",
    "InvalidState",
    "PayloadTooLarge",
    "ProviderError",
    "ProviderNotFound",
    "ProviderRejected",
    "ProviderUnavailable",
    "RateLimited",
    "ReauthRequired",
    "StoreUnavailable",
    "Unauthenticated",
    "Unavailable",
    "UpstreamUnavailable",
]


class BrokerError(Exception):
    """An error with a place in the HTTP contract."""

    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.title
        super().__init__(self.detail)


class InvalidRequest(BrokerError):
    status, code, title = 400, "invalid_request", "Invalid request"


class InvalidState(InvalidRequest):
    """An authorization callback whose state is missing, unknown, expired or already used."""

    title = "Unknown, expired or already used authorization"


class Unauthenticated(BrokerError):
    status, code, title = 401, "unauthenticated", "Missing or unknown API key"


class Forbidden(BrokerError):
    status, code, title = 403, "forbidden", "Not allowed for this client"


class ProviderNotFound(BrokerError):
    status, code, title = 404, "provider_not_found", "Unknown provider"


class GrantNotFound(BrokerError):
    status, code, title = 404, "grant_not_found", "No grant for this provider and user"


class AppTokenNotConfigured(BrokerError):
    status, code, title = 404, "app_token_not_configured", "No app tokens for this provider"


class ReauthRequired(BrokerError):
    status, code, title = 409, "reauth_required", "The user must authorize again"


class PayloadTooLarge(BrokerError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class InvalidRefreshToken(BrokerError):
    status, code, title = 422, "invalid_refresh_token", "The provider rejected the refresh token"


class RateLimited(BrokerError):
    """The client is over its ``rate_limit``; ``retry_after`` is whole seconds (at least 1)."""

    status, code, title = 429, "rate_limited", "Too many requests from this client"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class GrantUnreadable(BrokerError):
    status, code, title = 500, "grant_unreadable", "The stored grant cannot be read"


class Unavailable(BrokerError):
    """Temporarily unavailable; ``retry_after`` is whole seconds for the Retry-After header."""

    status = 503

    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class UpstreamUnavailable(Unavailable):
    code, title = "upstream_unavailable", "The provider cannot refresh the token now"


class StoreUnavailable(Unavailable):
    code, title = "store_unavailable", "The grant store is unreachable"


class ConfigError(Exception):
    """A bad setting; the message starts with the setting's name."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {problem}")


class ProviderError(Exception):
    """A token endpoint call that produced no tokens; ``reason`` is a short safe code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ProviderRejected(ProviderError):
    """The provider refused the grant for good (the refresh token is dead)."""


class ProviderUnavailable(ProviderError):
    """The provider could not answer usefully now; ``retry_after`` if it said when to retry.
    ``rotated_refresh_token``: an otherwise unusable answer still carried a new refresh token,
    so the one presented is spent (kept out of the message: a secret)."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        retry_after: float | None = None,
        rotated_refresh_token: str | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after
        self.rotated_refresh_token = rotated_refresh_token
