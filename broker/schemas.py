"""The HTTP API's bodies as typed models: what handlers parse and answer, and what the OpenAPI
document (``broker.openapi``) describes. One definition of each, so the two cannot drift.

The answers live here; the request bodies, parsed strictly, in ``broker.request_bodies`` and are
re-exported from here. Descriptions live on the fields and in the class docstrings: they are the
document's text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from broker.models import GrantState
from broker.request_bodies import (
    MAX_EXPIRES_IN,
    AuthorizationRequest,
    GrantImport,
    RejectedToken,
    RequestBody,
)

__all__ = [
    "MAX_EXPIRES_IN",
    "Authorization",
    "AuthorizationRequest",
    "GrantImport",
    "GrantList",
    "GrantStatus",
    "Health",
    "Problem",
    "ProblemCode",
    "Readiness",
    "ReadinessCheck",
    "RejectedToken",
    "RequestBody",
    "Token",
]

ProblemCode = Literal[
    "invalid_request",
    "unauthenticated",
    "forbidden",
    "provider_not_found",
    "grant_not_found",
    "app_token_not_configured",
    "reauth_required",
    "payload_too_large",
    "rate_limited",
    "invalid_refresh_token",
    "grant_unreadable",
    "upstream_unavailable",
    "store_unavailable",
    "not_found",
    "method_not_allowed",
    "internal_error",
]


def _timestamp(description: str, **kwargs: Any) -> Any:
    """A field holding an RFC 3339 UTC time to the second (``models.iso``)."""
    return Field(description=description, json_schema_extra={"format": "date-time"}, **kwargs)


def _example(value: Any) -> Any:
    return {"example": value}


class _Answer(BaseModel):
    """A response body: built by handlers from values they trust, never from client input."""

    model_config = ConfigDict(frozen=True)


class Token(_Answer):
    """A current access token for one (provider, user id), or for the provider's own client
    (an app token). Never cache it beyond `expires_at`; fetch again instead."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_example(
            {
                "access_token": "eyJhbGciOi...",
                "token_type": "Bearer",
                "expires_at": "2026-11-25T02:00:00Z",
                "expires_in": 3412,
                "scope": "public_api",
            }
        ),
    )

    access_token: str = Field(
        repr=False, description="The access token to send to the provider's API."
    )
    token_type: str = Field(
        description="The token type the provider issued, usually `Bearer`.",
        json_schema_extra=_example("Bearer"),
    )
    expires_at: str | None = _timestamp(
        "When the access token expires (RFC 3339, UTC, to the second); null when the provider "
        "stated no expiry for a token it issued without a refresh token (Cloud 66, GitHub OAuth "
        "apps): such a token is handed out as it is until it is refused or the grant deleted."
    )
    expires_in: int | None = Field(
        ge=0, description="Seconds from now until `expires_at`; null when `expires_at` is."
    )
    scope: str | None = Field(
        description="The space-separated scopes granted, or null when the provider did not say."
    )


GRANT_STATUS_EXAMPLE = {
    "provider": "alfresco",
    "user_id": "u-1",
    "state": "active",
    "scope": "public_api",
    "has_refresh_token": True,
    "access_expires_at": "2026-11-25T02:00:00Z",
    "next_refresh_at": "2026-11-25T01:54:21Z",
    "last_refreshed_at": "2026-11-25T01:00:00Z",
    "refresh_count": 12,
    "consecutive_failures": 0,
    "last_error": None,
    "refresh_token_issued_at": "2026-11-25T01:00:00Z",
    "refresh_token_expires_at": None,
    "created_at": "2026-11-20T09:12:00Z",
    "updated_at": "2026-11-25T01:00:00Z",
}


class GrantStatus(_Answer):
    """What the broker holds for one (provider, user id), without any secret."""

    # Open, for clients, as fields get added. A field Grant.status() has and this model lacks
    # would be dropped from answers: tests/test_contract.py fails on that.
    model_config = ConfigDict(json_schema_extra=_example(GRANT_STATUS_EXAMPLE))

    provider: str = Field(description="The provider's name.")
    user_id: str = Field(description="The user id, decoded.")
    state: GrantState = Field(
        description="`active`: refreshing normally. `refresh_failing`: transient refresh "
        "failures, still retrying. `reauth_required`: the provider rejected the refresh token "
        "(or, for a grant without one, its access token expired or was refused); kept for "
        "inspection, no longer refreshed, a user must authorize again."
    )
    has_refresh_token: bool = Field(
        default=True,
        description="False for a grant of a provider that issued no refresh token (Cloud 66, "
        "GitHub OAuth apps): it holds an access token alone, served until its expiry (if it "
        "has one) and never refreshed; `next_refresh_at` is null.",
    )
    scope: str | None = Field(
        description="The space-separated scopes granted (after an authorization, what the "
        "provider granted, which may be narrower than requested), or null when unknown."
    )
    access_expires_at: str | None = _timestamp(
        "When the held access token expires; null when none is held."
    )
    next_refresh_at: str | None = _timestamp(
        "When the broker plans to refresh next; null when it will not (e.g. `reauth_required`)."
    )
    last_refreshed_at: str | None = _timestamp(
        "When the last successful refresh happened; null before the first."
    )
    refresh_count: int = Field(ge=0, description="Successful refreshes so far.")
    consecutive_failures: int = Field(
        ge=0, description="Failed refresh attempts since the last success."
    )
    last_error: str | None = Field(
        description="A short safe reason for the last failed refresh (never a token), or null."
    )
    refresh_token_issued_at: str | None = _timestamp(
        "When the current refresh token was issued (imported, exchanged or rotated), or null "
        "when unknown.",
        default=None,
    )
    refresh_token_expires_at: str | None = _timestamp(
        "When the current refresh token expires, if the provider said; otherwise null.",
        default=None,
    )
    created_at: str = _timestamp("When the grant was first stored.")
    updated_at: str = _timestamp("When the grant last changed.")


class GrantList(_Answer):
    """A page of one provider's grants. Pass `next_cursor` back as `cursor` for the next page
    until it is null. A page may hold fewer grants than `limit`, even none, while
    `next_cursor` is not null; a grant that exists throughout a listing appears in it at least
    once, possibly more than once when grants change meanwhile. Order is unspecified."""

    model_config = ConfigDict(
        json_schema_extra=_example(
            {
                "grants": [GRANT_STATUS_EXAMPLE],
                "next_cursor": "MS5hbGZyZXNjby5hbGwuMC4xNzkyLi4w",
            }
        )
    )

    grants: list[GrantStatus] = Field(description="The grants of this page, each its status.")
    next_cursor: str | None = Field(
        description="The `cursor` of the next page, opaque; null when the listing is complete."
    )


class Authorization(_Answer):
    """A started authorization: send the user's browser to `authorization_url`."""

    model_config = ConfigDict(
        json_schema_extra=_example(
            {
                "authorization_url": "https://provider/authorize?response_type=code&client_id="
                "broker&redirect_uri=https%3A%2F%2Fbroker.example%2Foauth%2Falfresco%2Fcallback"
                "&scope=public_api&state=Zq3...&code_challenge=E9Mel...&code_challenge_method=S256",
                "state": "Zq3...",
                "expires_at": "2026-11-25T01:10:00Z",
            }
        )
    )

    authorization_url: str = Field(
        description="The provider's authorize URL with `response_type=code`, `client_id`, "
        "`redirect_uri`, `scope` (when there is one), `state` and PKCE (`code_challenge`, "
        "`code_challenge_method=S256`) unless the provider disables PKCE.",
        json_schema_extra={"format": "uri"},
    )
    state: str = Field(
        repr=False,
        description="The single-use state bound to this flow (43 base64url characters). The "
        "broker does not store it, only its SHA-256.",
    )
    expires_at: str = _timestamp(
        "When the state expires (`authorization_ttl` after creation, 10 minutes by default)."
    )


class Problem(_Answer):
    """An error (RFC 9457 problem details) with a stable machine-readable `code`."""

    type: str = Field(
        description="A URI naming the problem type: `urn:broker:problem:<code>`.",
        json_schema_extra={
            "format": "uri-reference",
            "example": "urn:broker:problem:grant_not_found",
        },
    )
    title: str = Field(description="A short human-readable summary of the problem type.")
    status: int = Field(ge=400, le=599, description="The HTTP status code.")
    detail: str = Field(
        description="A human-readable explanation of this occurrence; never contains a token, "
        "key or secret."
    )
    code: ProblemCode = Field(
        description="The stable machine-readable error code; clients branch on this."
    )
    request_id: str | SkipJsonSchema[None] = Field(
        default=None,
        description="The request id (same as the `X-Request-Id` response header).",
    )


class Health(_Answer):
    """Liveness."""

    model_config = ConfigDict(json_schema_extra=_example({"status": "ok"}))

    status: Literal["ok"]


class ReadinessCheck(_Answer):
    """The result of one readiness check; fields other than `ok` depend on the check."""

    ok: bool = Field(description="Whether this check passed.")
    latency_ms: Annotated[float, Field(ge=0)] | SkipJsonSchema[None] = Field(
        default=None, description="How long the check took, in milliseconds."
    )
    detail: str | SkipJsonSchema[None] = Field(default=None, description="Why the check failed.")
    keys: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(
        default=None, description="`encryption_keys`: how many encryption keys are loaded."
    )
    lag_seconds: float | SkipJsonSchema[None] = Field(
        default=None,
        description="`scheduler`: how far behind its schedule the background refresher is.",
    )


class Readiness(_Answer):
    """Readiness, with the result of each check."""

    model_config = ConfigDict(
        json_schema_extra=_example(
            {
                "status": "ready",
                "checks": {
                    "redis": {"ok": True, "latency_ms": 0.4},
                    "encryption_keys": {"ok": True},
                },
            }
        )
    )

    status: Literal["ready", "not_ready"] = Field(description="`ready` when every check is ok.")
    checks: dict[str, ReadinessCheck] = Field(
        description="One entry per check, by name (`redis`, `encryption_keys`, `scheduler`, "
        "`shutdown`, ...)."
    )
