"""The client library's exceptions: one class per problem ``code`` of the broker's HTTP contract.

Each carries the answer's ``status``, ``code``, ``detail`` and ``request_id`` (quote it to the
operators: it finds the broker's log line). Messages hold what the broker said, never a token.

    BrokerError                        any failure to get a token from the broker
    ├── InvalidRequest                 400 invalid_request
    ├── Unauthenticated                401 unauthenticated (missing or unknown API key)
    ├── Forbidden                      403 forbidden
    ├── ProviderNotFound               404 provider_not_found
    ├── GrantNotFound                  404 grant_not_found
    ├── AppTokenNotConfigured          404 app_token_not_configured
    ├── ReauthRequired                 409 reauth_required (a user must authorize again)
    ├── PayloadTooLarge                413 payload_too_large
    ├── InvalidRefreshToken            422 invalid_refresh_token
    ├── GrantUnreadable                500 grant_unreadable
    ├── TryLater                       retried by the client until its wait budget is spent
    │   ├── RateLimited                429 rate_limited
    │   ├── UpstreamUnavailable        503 upstream_unavailable
    │   └── StoreUnavailable           503 store_unavailable
    ├── UnexpectedAnswer               any other status or code (a newer broker, a proxy)
    └── BrokerUnreachable              no HTTP answer at all (connection refused, reset, timeout)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AppTokenNotConfigured",
    "BrokerError",
    "BrokerUnreachable",
    "Forbidden",
    "GrantNotFound",
    "GrantUnreadable",
    "InvalidRefreshToken",
    "InvalidRequest",
    "PayloadTooLarge",
    "ProviderNotFound",
    "RateLimited",
    "ReauthRequired",
    "StoreUnavailable",
    "TryLater",
    "Unauthenticated",
    "UnexpectedAnswer",
    "UpstreamUnavailable",
    "error_from_answer",
]


class BrokerError(Exception):
    """A request to the broker that produced no token."""

    code = "broker_error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        if code is not None:
            self.code = code
        self.detail = detail
        self.request_id = request_id
        where = f" (request {request_id})" if request_id else ""
        shown = f"{status} {self.code}" if status is not None else self.code
        super().__init__(f"{shown}: {detail}{where}")


class InvalidRequest(BrokerError):
    code = "invalid_request"


class Unauthenticated(BrokerError):
    code = "unauthenticated"


class Forbidden(BrokerError):
    code = "forbidden"


class ProviderNotFound(BrokerError):
    code = "provider_not_found"


class GrantNotFound(BrokerError):
    code = "grant_not_found"


class AppTokenNotConfigured(BrokerError):
    code = "app_token_not_configured"


class ReauthRequired(BrokerError):
    """The provider rejected the grant's refresh token: a user must authorize again."""

    code = "reauth_required"


class PayloadTooLarge(BrokerError):
    code = "payload_too_large"


class InvalidRefreshToken(BrokerError):
    code = "invalid_refresh_token"


class GrantUnreadable(BrokerError):
    code = "grant_unreadable"


class TryLater(BrokerError):
    """Temporary; ``retry_after`` is the seconds the broker asked to wait (None: unsaid)."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, request_id=request_id)
        self.retry_after = retry_after


class RateLimited(TryLater):
    code = "rate_limited"


class UpstreamUnavailable(TryLater):
    """The token is expired and the provider cannot refresh it now."""

    code = "upstream_unavailable"


class StoreUnavailable(TryLater):
    code = "store_unavailable"


class UnexpectedAnswer(BrokerError):
    """A status or problem code this library does not know (``code`` is the answer's, if any)."""

    code = "unexpected_answer"


class BrokerUnreachable(BrokerError):
    """No HTTP answer from the broker: connection refused or reset, or the request timed out."""

    code = "broker_unreachable"


_BY_CODE: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthenticated,
        Forbidden,
        ProviderNotFound,
        GrantNotFound,
        AppTokenNotConfigured,
        ReauthRequired,
        PayloadTooLarge,
        InvalidRefreshToken,
        GrantUnreadable,
        RateLimited,
        UpstreamUnavailable,
        StoreUnavailable,
    )
}
_DETAIL_LIMIT = 500  # a proxy's HTML error page is not a useful message


def error_from_answer(
    status: int,
    body: Any,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> BrokerError:
    """The exception for a non-2xx answer: by its problem ``code``, else UnexpectedAnswer."""
    problem = body if isinstance(body, dict) else {}
    code = problem.get("code")
    detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
    detail = str(detail)[:_DETAIL_LIMIT]
    request_id = request_id or _str_or_none(problem.get("request_id"))
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        known = code if isinstance(code, str) and code else None
        return UnexpectedAnswer(detail, status=status, code=known, request_id=request_id)
    if issubclass(cls, TryLater):
        return cls(detail, status=status, request_id=request_id, retry_after=retry_after)
    return cls(detail, status=status, request_id=request_id)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
