"""The HTTP API's request bodies as typed models, parsed strictly: what clients send, as
``broker.schemas`` holds what the broker answers (and re-exports these).

No coercion: ``"10"`` is not an integer, ``true`` is not 1; every refusal is ``InvalidRequest``
with the field's own message. Descriptions on the fields and class docstrings are the OpenAPI
document's text.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from broker.errors import InvalidRequest
from broker.models import MAX_SCOPE_CHARS, MAX_TOKEN_CHARS, MAX_USER_ID_BYTES

__all__ = [
    "MAX_EXPIRES_IN",
    "AuthorizationRequest",
    "GrantImport",
    "RejectedToken",
    "RequestBody",
    "TokenText",
]

MAX_EXPIRES_IN = 366 * 86400


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
    """A refresh token to import (migration, tests). Only `refresh_token` is required;
    `expires_in` describes `access_token`, so send both or neither."""

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
        "scope": "scope must be a string",
    }

    refresh_token: TokenText = Field(
        repr=False, description="The refresh token; stored encrypted, never returned."
    )
    access_token: TokenText | None = Field(
        default=None,
        repr=False,
        description="A current access token for this refresh token. Without it the broker "
        "refreshes at once to validate the refresh token.",
    )
    expires_in: Annotated[int, Field(ge=1, le=MAX_EXPIRES_IN)] | None = Field(
        default=None,
        description="Seconds until `access_token` expires; 3600 when absent unless the provider "
        "sets `default_expires_in`.",
    )
    scope: Annotated[str, Field(max_length=MAX_SCOPE_CHARS)] | None = Field(
        default=None, description="The space-separated scopes the tokens carry."
    )

    @field_validator("expires_in")
    @classmethod
    def _goes_with_access_token(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A field validator, not a model one: checked before ``scope``, as it always was.
        if value is not None and info.data.get("access_token") is None:
            raise ValueError("expires_in describes an access_token; send both or neither")
        return value


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
