"""The HTTP API's request bodies as typed models, parsed strictly: what clients send, as
``broker.schemas`` holds what the broker answers (and re-exports these).

No coercion: ``"10"`` is not an integer, ``true`` is not 1; every refusal is ``InvalidRequest``
with the field's own message. Descriptions on the fields and class docstrings are the OpenAPI
document's text.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from broker.errors import InvalidRequest
from broker.models import MAX_EXPIRES_IN, MAX_SCOPE_CHARS, MAX_TOKEN_CHARS, MAX_USER_ID_BYTES

__all__ = [
    "MAX_EXPIRES_IN",
    "AuthorizationRequest",
    "GrantImport",
    "RejectedToken",
    "RequestBody",
    "TokenText",
]


def _example(value: Any) -> Any:
    return {"example": value}


class RequestBody(BaseModel):
    """A JSON request body, parsed strictly; ``messages`` holds each field's refusal text."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")
    messages: ClassVar[dict[str, str]]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Self:
        """The validated body, or InvalidRequest naming unknown fields or the first bad one
        (in declaration order)."""
        try:
            return cls.model_validate(body)
        except ValidationError as err:
            raise InvalidRequest(cls._refusal(err)) from None

    @classmethod
    def _refusal(cls, err: ValidationError) -> str:
        errors = err.errors(include_url=False, include_input=False)
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        if unknown:
            return f"unknown field(s): {', '.join(unknown)}"
        order = {name: index for index, name in enumerate(cls.model_fields)}
        first = min(errors, key=lambda e: order.get(str(e["loc"][0]), -1) if e["loc"] else -1)
        if first["type"] == "value_error":  # a rule between fields: its own message
            return str(first["ctx"]["error"])
        field = str(first["loc"][0]) if first["loc"] else ""
        return cls.messages.get(field, "the body must be a JSON object")


TokenText = Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_CHARS)]


class GrantImport(RequestBody):
    """A refresh token to import (migration, tests), or an access token alone for a provider
    that issues no refresh token (Cloud 66, GitHub OAuth apps). `refresh_token` is required
    unless `access_token` comes alone; `expires_in` or `expires_at` describes `access_token`,
    so send it only with one."""

    model_config = ConfigDict(
        json_schema_extra=_example(
            {
                "refresh_token": "def50200a1...",
                "access_token": "eyJhbGciOi...",
                "expires_in": 3600,
                "scope": "public_api",
            }
        )
    )
    messages: ClassVar[dict[str, str]] = {
        "refresh_token": "refresh_token is required: a non-empty string",
        "access_token": "access_token must be a non-empty string",
        "expires_in": f"expires_in must be an integer from 1 to {MAX_EXPIRES_IN}",
        "expires_at": "expires_at must be an RFC 3339 date-time with a time zone "
        "(2026-11-25T02:00:00Z)",
        "scope": "scope must be a string",
    }

    refresh_token: TokenText | None = Field(
        default=None,
        repr=False,
        description="The refresh token; stored encrypted, never returned. Required unless "
        "`access_token` comes alone: a grant of a provider that issues no refresh token, "
        "served until its expiry and never refreshed.",
    )
    access_token: TokenText | None = Field(
        default=None,
        repr=False,
        description="A current access token for this refresh token. Without it the broker "
        "refreshes at once to validate the refresh token. Alone, it is the whole grant.",
    )
    expires_in: Annotated[int, Field(ge=1, le=MAX_EXPIRES_IN)] | None = Field(
        default=None,
        description="Seconds until `access_token` expires. When neither this nor `expires_at` "
        "is given: with a `refresh_token`, 3600 unless the provider sets "
        "`default_expires_in`; alone, the access token does not expire.",
    )
    expires_at: str | None = Field(
        default=None,
        description="When `access_token` expires (RFC 3339 with a time zone), instead of "
        "`expires_in`; in the future, at most as far as `expires_in` may be.",
        json_schema_extra={"format": "date-time"},
    )
    scope: Annotated[str, Field(max_length=MAX_SCOPE_CHARS)] | None = Field(
        default=None, description="The space-separated scopes the tokens carry."
    )

    @field_validator("expires_in", "expires_at")
    @classmethod
    def _goes_with_access_token(cls, value: object, info: ValidationInfo) -> object:
        # A field validator, not a model one: checked before ``scope``, as it always was.
        if value is not None and info.data.get("access_token") is None:
            raise ValueError(f"{info.field_name} describes an access_token; send both or neither")
        if info.field_name == "expires_at" and value is not None:
            if info.data.get("expires_in") is not None:
                raise ValueError("send expires_in or expires_at, not both")
            try:
                _timestamp(str(value))
            except (ValueError, OverflowError):
                raise PydanticCustomError("date_time", "not an RFC 3339 date-time") from None
        return value

    @model_validator(mode="after")
    def _a_token(self) -> Self:
        if self.refresh_token is None and self.access_token is None:
            raise ValueError(
                "refresh_token is required: a non-empty string (or, for a provider that "
                "issues no refresh token, access_token alone)"
            )
        return self

    def expires_at_timestamp(self) -> float | None:
        """``expires_at`` as Unix time."""
        return None if self.expires_at is None else _timestamp(self.expires_at)


def _timestamp(text: str) -> float:
    """An RFC 3339 date-time with a time zone as Unix time; ValueError otherwise."""
    if len(text) > 64 or "T" not in text.upper():
        raise ValueError("not an RFC 3339 date-time")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("an RFC 3339 date-time needs a time zone")
    return parsed.timestamp()


class AuthorizationRequest(RequestBody):
    """Start an authorization-code flow for one user."""

    model_config = ConfigDict(
        json_schema_extra=_example(
            {"user_id": "u-1", "redirect_after": "https://app.example/done", "scope": "public_api"}
        )
    )
    messages: ClassVar[dict[str, str]] = {
        "user_id": "user_id is required: a string",
        "redirect_after": "redirect_after is required: a URL in the redirect allow-list",
        "scope": "scope must be a string",
    }

    # Its length and characters are checked by validate_user_id, after the other fields.
    user_id: str = Field(
        description="The user id the resulting grant belongs to: 1 to "
        f"{MAX_USER_ID_BYTES} bytes of UTF-8, no control characters.",
        json_schema_extra={"minLength": 1},
    )
    redirect_after: str = Field(
        min_length=1,
        description="Where the user's browser is sent when the flow ends (with `status=...`): "
        "an absolute http(s) URL matching the broker's or the provider's allow-list (same "
        "scheme, host and port; path at or below the entry's path), at most 2048 printable "
        "ASCII characters. Its query and fragment are kept.",
        json_schema_extra={"format": "uri"},
    )
    scope: str | None = Field(
        default=None,
        description="The scopes to request, separated by single spaces (RFC 6749 §3.3 scope "
        "tokens); the provider's configured `scopes` when absent. The provider's "
        "`required_scopes` are always added. The grant records the scope the provider actually "
        "granted, which may be narrower.",
    )


class RejectedToken(RequestBody):
    """An access token a resource server refused although it should still be valid (revoked
    early, keys rotated at the provider)."""

    model_config = ConfigDict(json_schema_extra=_example({"rejected_token": "eyJhbGciOi..."}))
    messages: ClassVar[dict[str, str]] = {
        "rejected_token": "rejected_token is required: a non-empty string",
    }

    rejected_token: TokenText = Field(
        repr=False,
        description="The access token the resource server refused, as the broker handed it "
        "out. Compared in constant time with the one the grant holds; never logged.",
    )
