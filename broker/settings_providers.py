"""The ``[providers.<name>]`` and ``[[clients]]`` tables of broker.toml, as typed models.

Like :class:`broker.settings_model.Settings`, each field is the whole definition of a setting:
its type, default, constraints and ``description`` (the documentation's "meaning" column).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from broker.settings_types import (
    SHA256_HEX,
    AllowlistEntry,
    Count,
    Derived,
    Flag,
    HttpUrl,
    Number,
    SecretText,
    ShownDefault,
    Text,
    UrlOrEmpty,
    insecure_url_problem,
    matching,
    setting_error,
)

Permission = Literal["tokens:read", "grants:write", "grants:read"]
PERMISSIONS: frozenset[str] = frozenset(get_args(Permission))
ClientAuth = Literal["client_secret_basic", "client_secret_post"]
CLIENT_AUTH_METHODS: tuple[str, ...] = get_args(ClientAuth)
ENDPOINTS = ("token_url", "authorize_url", "revocation_url", "issuer", "discovery_url")
SECRET_SOURCES = ("client_secret", "client_secret_env", "client_secret_file")
# The rule of ``_endpoints_and_secret`` that a provider has a token endpoint, a non-empty
# ``token_url``, or discovers one, in its JSON Schema (for editors and the Helm chart's schema).
TOKEN_ENDPOINT_GIVEN: JsonDict = {
    "anyOf": [
        {"required": ["token_url"], "properties": {"token_url": {"minLength": 1}}},
        {"required": ["issuer"], "properties": {"issuer": {"type": "string"}}},
        {"required": ["discovery_url"], "properties": {"discovery_url": {"type": "string"}}},
    ]
}


class ProviderSettings(BaseModel):
    """A [providers.<name>] table: an OAuth2 authorization server; the name is in API paths."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=TOKEN_ENDPOINT_GIVEN)

    name: Derived[str]  # the table's name
    token_url: Annotated[UrlOrEmpty, ShownDefault("required (unless discovered)")] = Field(
        default="",  # "" only until start-up discovery fills it from issuer / discovery_url
        description="the token endpoint; `https` unless the host is loopback or "
        "`allow_insecure_http = true`",
    )
    authorize_url: HttpUrl | None = Field(
        default=None,
        description="the authorization endpoint; without it the provider cannot start "
        "authorizations (grants come by import only)",
    )
    revocation_url: HttpUrl | None = Field(
        default=None,
        description="RFC 7009 endpoint; when set, deleting a grant revokes its refresh token there",
    )
    issuer: HttpUrl | None = Field(
        default=None,
        description="OpenID Connect discovery: broker reads "
        "`{issuer}/.well-known/openid-configuration` once at start-up and takes `token_url`, "
        "`authorize_url` and `revocation_url` from it where they are not set here; the "
        "document must name this issuer",
    )
    discovery_url: HttpUrl | None = Field(
        default=None,
        description="the metadata document's own URL, when it is not under `{issuer}` (also "
        "RFC 8414 `/.well-known/oauth-authorization-server`); with `issuer` as well, the issuer "
        "is still checked",
    )
    client_id: Text = Field(description="the client id registered at the provider")
    client_secret: SecretText | None = Field(
        default=None,
        description="the client secret itself, inline: for development only",
    )
    client_secret_env: Text | None = Field(
        default=None,
        description="the environment variable holding the client secret",
    )
    client_secret_file: Text | None = Field(
        default=None,
        description="a file holding the client secret (a mounted secret); relative paths are "
        "relative to the config file",
    )
    client_auth: ClientAuth = Field(
        default="client_secret_basic",
        description="how the client authenticates at the token endpoint",
    )
    scopes: tuple[Text, ...] = Field(
        default=(),
        description="scopes requested when a client starts an authorization without naming any",
    )
    required_scopes: tuple[Text, ...] = Field(
        default=(),
        description="scopes always requested, even when the client names its own (e.g. "
        "`offline_access` where a refresh token depends on it)",
    )
    default_expires_in: Count = Field(
        default=3600,
        ge=1,
        le=366 * 86400,
        description="access-token lifetime (seconds) assumed when the provider omits `expires_in`; "
        "not for an access token that comes without a refresh token (it is held without expiry)",
    )
    require_refresh_token: Flag = Field(
        default=False,
        description="refuse a token answer without a refresh token (callback "
        "`status=error&code=no_refresh_token`, imports of an access token alone `400`) instead "
        "of holding the access token alone: for providers that issue one only for a scope "
        "such as `offline_access`, where a missing one is a configuration mistake",
    )
    pkce: Flag = Field(
        default=True,
        description="use PKCE S256 in the authorization-code flow; `false` only for a provider "
        "that rejects it",
    )
    redirect_allowlist: tuple[AllowlistEntry, ...] = Field(
        default=(),
        description="more `redirect_after` destinations for this provider only, added to the "
        "top-level list",
    )
    refresh_token_max_age: Count | None = Field(
        default=None,
        ge=1,
        description="the provider's refresh-token lifetime in seconds, if it states one (e.g. "
        "604800 for 7 days): the grant status shows `refresh_token_expires_at` and metrics count "
        "grants near it",
    )
    max_concurrency: Annotated[Count | None, ShownDefault("`provider_concurrency`")] = Field(
        default=None,
        ge=1,
        le=4096,
        description="refreshes one process runs at once against this provider",
    )
    reauth_errors: tuple[Text, ...] = Field(
        default=("invalid_grant",),
        description="OAuth error codes that mean the grant is dead (state `reauth_required`); "
        "any other error is transient and retried. Add `invalid_client` only if you would rather "
        "mark every grant dead than retry after a client-secret mistake.",
    )
    client_credentials: Flag = Field(
        default=False,
        description="hand out access tokens for this provider's own client "
        "(`GET /v1/app-tokens/<name>`, the client-credentials grant of RFC 6749 §4.4); off, that "
        "endpoint answers `404 app_token_not_configured`; needs a client secret",
    )
    allow_insecure_http: Flag = Field(
        default=False,
        description="allow plain `http` URLs for non-loopback hosts (a dev provider in "
        "docker-compose)",
    )

    @property
    def discovers(self) -> bool:
        """Whether start-up discovery fills this provider's endpoints."""
        return self.issuer is not None or self.discovery_url is not None

    @property
    def metadata_url(self) -> str | None:
        """Where the provider's metadata document is, when it is discovered."""
        if self.discovery_url is not None:
            return self.discovery_url
        if self.issuer is not None:
            return self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        return None

    @model_validator(mode="after")
    def _endpoints_and_secret(self) -> Self:
        """Endpoints are https (unless loopback or allowed), a token endpoint is given or
        discovered, and the client secret comes from one place at most."""
        for setting in ENDPOINTS:
            value = getattr(self, setting)
            problem = value and insecure_url_problem(value, self.allow_insecure_http)
            if problem:
                raise setting_error(setting, problem)
        if not self.token_url and not self.discovers:
            raise setting_error("token_url", "required (or issuer / discovery_url)")
        given = [key for key in SECRET_SOURCES if getattr(self, key) is not None]
        if len(given) > 1:
            raise setting_error(given[1], f"give only one of {', '.join(given)}")
        if self.client_credentials and not given:
            # RFC 6749 §4.4: only a confidential client may use the client-credentials grant.
            raise setting_error(
                "client_credentials", f"needs a client secret ({', '.join(SECRET_SOURCES)})"
            )
        return self


KeyHash = Annotated[
    str, matching(SHA256_HEX, "must be 64 hex digits (see `broker apikey`)", str.lower)
]


class OneOrMany:
    """A list setting that may also be written as its one item (``key_sha256 = "..."``); the
    JSON Schema says both."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_before_validator_function(
            lambda value: (value,) if isinstance(value, str) else value, handler(source)
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        many = handler(schema)
        return {"anyOf": [many["items"], many]}


MAX_USER_ID_PATTERNS = 256
CLIENT_PROVIDER = re.compile(r"^(\*|[a-z0-9][a-z0-9_-]{0,62})$")  # a provider name, or "*"


class RateLimit(BaseModel):
    """A client's ``rate_limit``: a token bucket shared by all replicas (broker/ratelimit.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_second: Number = Field(
        gt=0, le=1_000_000, description="the sustained rate the bucket refills at"
    )
    burst: Count = Field(
        ge=1, le=1_000_000, description="the bucket's size: requests allowed at once after a pause"
    )


class ClientSettings(BaseModel):
    """A [[clients]] table: an internal service calling the broker with an API key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Text = Field(description="shown in logs, the audit line and metrics")
    key_sha256: Annotated[tuple[KeyHash, ...], OneOrMany()] = Field(
        min_length=1,
        repr=False,
        description="hex SHA-256 of the client's API key (`broker apikey` prints both), or a "
        "list of them: every key listed works, so a key is rotated without downtime (add the "
        "new one, move the client over, remove the old one); the key itself is never configured",
    )
    providers: tuple[
        Annotated[str, matching(CLIENT_PROVIDER, 'must be a provider name or "*"')], ...
    ] = Field(min_length=1, description='provider names the client may use, or `["*"]`')
    permissions: frozenset[Permission] = Field(
        min_length=1,
        description="`tokens:read` (fetch access tokens), `grants:write` (import, delete, start "
        "authorizations), `grants:read` (grant status)",
    )
    user_ids: tuple[Text, ...] | None = Field(
        default=None,
        max_length=MAX_USER_ID_PATTERNS,
        description="glob patterns (`*` any characters, `/` included; `?` one character; "
        "`[abc]`, `[a-z]`, `[!abc]` one of / none of; case-sensitive, against the whole decoded "
        "user id): the client may only name matching user ids, others answer `403 forbidden`, "
        "and grant listings show it only those; none: every user id; `[]`: no user id at all "
        "(a client for app tokens only)",
    )
    rate_limit: RateLimit | None = Field(
        default=None,
        description="`{ requests_per_second, burst }`: a token bucket shared by all replicas; "
        "over it, `429 rate_limited` with `Retry-After`; none: no limit",
    )

    def may_use(self, provider: str) -> bool:
        return "*" in self.providers or provider in self.providers


def check_clients(
    clients: Sequence[ClientSettings], providers: Mapping[str, ProviderSettings]
) -> None:
    """Clients name configured providers, and no name or key is configured twice."""
    names: set[str] = set()
    digests: set[str] = set()
    for client in clients:
        where = f"clients.{client.name}"
        for provider in client.providers:
            if provider != "*" and provider not in providers:
                raise setting_error(f"{where}.providers", f"unknown provider {provider!r}")
        if client.name in names:
            raise setting_error(where, "client name appears twice")
        for digest in client.key_sha256:
            if digest in digests:
                raise setting_error(f"{where}.key_sha256", "the same key is configured twice")
            digests.add(digest)
        names.add(client.name)
