"""The one definition of broker's settings: :class:`Settings` (the top level of broker.toml),
with :class:`~broker.settings_providers.ProviderSettings` and
:class:`~broker.settings_providers.ClientSettings` for its tables.

Everything else is generated from these models: validation and its error messages
(``broker.config``), the ``BROKER_<NAME>`` environment variables, ``broker config-schema``, the
settings tables of docs/configuration.md and the ``config`` and ``providers`` parts of the Helm
chart's values.schema.json (``python -m broker.settings_docs``).

To add a setting, add one field to the model it belongs to, with its type (``Count`` for whole
numbers, ``Number`` for seconds), its default, its constraints (``ge``, ``le``, ``gt``, a
``Check``) and a ``description`` (the documentation's "meaning"); rules that involve several
settings go in :mod:`broker.settings_rules`, raising ``setting_error(name, problem)``. Then run
``python -m broker.settings_docs`` to regenerate the documentation and the chart's schema
(tests/test_settings_generated.py fails until you do). Nothing else is written by hand; only a
new ``[[clients]]`` setting also needs the Helm chart, which passes a client's keys by name (its
``clients`` schema and the clients.toml template).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from broker.settings_layers import layers
from broker.settings_providers import ClientSettings, ProviderSettings
from broker.settings_rules import check_together
from broker.settings_types import (
    AUTHORIZATION_TTL,
    KEY_PREFIX,
    MEMORY_URL,
    PROVIDER_NAME,
    AllowlistEntry,
    CaseInsensitive,
    Count,
    Derived,
    Flag,
    Number,
    RedisUrl,
    ShownDefault,
    Text,
    UrlOrEmpty,
    matching,
    setting_error,
    without_password,
)
from broker.settings_webhooks import WebhookSettings

ProviderName = Annotated[str, matching(PROVIDER_NAME, "name must match [a-z0-9][a-z0-9_-]{0,62}")]
LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], CaseInsensitive]


class Settings(BaseSettings):
    """broker.toml; each top-level setting may also come from the variable BROKER_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", frozen=True, extra="forbid")

    redis_url: RedisUrl = Field(
        default=MEMORY_URL,
        repr=False,  # may hold a password: see redis_url_safe
        description="`redis://[user:password@]host:port/db`, `rediss://` (TLS), `unix://`, or a "
        "Sentinel-managed primary: `redis+sentinel://[:password@]host:port[,host:port]/service"
        "[/db]` (the password is the primary's; the client asks the sentinels again after a "
        "failover), or a Redis Cluster: `redis+cluster://[:password@]host:port[,host:port]` "
        "(seed nodes; set `schedule_shards`). `memory://` is an embedded store inside the "
        "process: not durable, not shared between replicas; for trying broker out and for "
        "development only.",
    )
    host: str = Field(default="0.0.0.0", description="listen address")  # noqa: S104
    port: Count = Field(default=8080, ge=0, le=65535, description="listen port")
    workers: Count = Field(
        default=1,
        ge=1,
        le=64,
        description="processes serving the port (`broker serve --workers N` overrides): more "
        "than 1 starts a supervisor and N worker processes, each a whole broker (requests, "
        "refresher) sharing the work through Redis like replicas; `/metrics` adds them up. "
        "Needs a shared Redis (not `memory://`); about one per CPU core the pod may use (see "
        "[operations.md](operations.md#workers-and-replicas))",
    )
    public_url: Annotated[UrlOrEmpty, ShownDefault("`http://127.0.0.1:{port}`")] = Field(
        default="",
        description="the base URL users' browsers reach broker at; the OAuth callback is "
        "`{public_url}/oauth/{provider}/callback`",
    )
    redirect_allowlist: tuple[AllowlistEntry, ...] = Field(
        default=(),
        description="where the authorization flow may send users back to: absolute http(s) URLs "
        "without user info, query or fragment; a `redirect_after` matches an entry with the same "
        "scheme, host and port and a path equal to or below the entry's (see [api.md](api.md)). "
        "Providers may add their own. In the environment: comma-separated.",
    )
    authorization_ttl: Count = Field(
        default=AUTHORIZATION_TTL,
        ge=60,
        le=3600,
        description="seconds a started authorization (its `state`) can be completed",
    )
    key_prefix: Annotated[str, matching(KEY_PREFIX, "must match [A-Za-z0-9_:.-]{1,64}")] = Field(
        default="broker",
        description="prefix of every Redis key, so several brokers (or tests) can share one Redis",
    )
    encryption_keys_env: Text = Field(
        default="BROKER_ENCRYPTION_KEYS",
        description="the environment variable holding the encryption keys",
    )
    encryption_keys_file: Text | None = Field(
        default=None,
        description="a file holding the encryption keys instead (a mounted secret); relative "
        "paths are relative to the config file",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="`auto`: console on a terminal, JSON otherwise"
    )
    log_level: LogLevel = Field(default="info", description="the least severe level logged")
    max_body_bytes: Count = Field(
        default=64 * 1024,
        ge=1024,
        le=16 << 20,
        description="larger request bodies get `413 payload_too_large`",
    )
    default_min_ttl: Count = Field(
        default=30,
        ge=0,
        description="`min_ttl` when a token request does not give one; at most `max_min_ttl`",
    )
    max_min_ttl: Count = Field(default=3600, ge=0, description="the largest `min_ttl` accepted")
    provider_timeout: Number = Field(
        default=10.0,
        gt=0,
        le=120,
        description="seconds for a whole call to a provider's token or revocation endpoint",
    )
    provider_connect_timeout: Number = Field(
        default=5.0, gt=0, le=60, description="seconds to connect to a provider"
    )
    provider_max_response_bytes: Count = Field(
        default=256 * 1024,
        ge=1,
        description="larger provider answers are treated as garbage (transient)",
    )
    ca_bundle: Text | None = Field(
        default=None,
        description="a PEM file of CA certificates trusted for broker's outbound HTTPS calls "
        "(providers, discovery), in addition to the system's: a private CA. Relative paths are "
        "relative to the config file. Certificates are always verified; start-up fails if the "
        "file does not load",
    )
    redis_timeout: Number = Field(
        default=2.0,
        gt=0,
        le=60,
        description="seconds for a Redis connect or command, and the longest a request waits for "
        "a free pooled connection",
    )
    rate_limit_timeout: Number = Field(
        default=0.1,
        gt=0,
        le=5,
        description="seconds a client's `rate_limit` check may take; a slower or failed check "
        "lets the request through (logged and counted: the limiter fails open)",
    )
    token_cache_seconds: Number = Field(
        default=5.0,
        ge=0,
        le=300,
        description="seconds a replica may answer token requests from the grants it read lately "
        "instead of reading Redis (0: off). Every grant write and delete is published to all "
        "replicas, which drop their copy within milliseconds; this is the bound for a change "
        "nobody published (an older replica during a rolling upgrade, a hand edit in Redis). "
        "A copy is served only while its access token is fresh enough for the request: see "
        "[performance.md](performance.md#the-grant-cache)",
    )
    token_cache_entries: Count = Field(
        default=10000,
        ge=1,
        le=1000000,
        description="grants a process keeps for `token_cache_seconds` (about 1 KB each); the "
        "oldest go first",
    )
    record_format: Count = Field(
        default=2,
        ge=1,
        le=2,
        description="the format grant records are written in: 2, compact (MessagePack, about 40 % "
        "of format 1's size); 1, JSON, the only one broker 0.1.0 reads. Every version since "
        "reads both: set 1 while replicas of 0.1.0 still run, 2 once none do "
        "(see [operations.md](operations.md#upgrading-from-010))",
    )
    redis_max_connections: Count = Field(
        default=64, ge=1, le=10000, description="connections in the Redis pool per process"
    )
    min_replicas_to_ack: Count = Field(
        default=0,
        ge=0,
        le=16,
        description="with replicas (Sentinel; refused with `redis+cluster`), each grant write and "
        "each lock waits (`WAIT`, in the same pipeline, so on the connection that wrote) until "
        "this many replicas hold it, so a failover cannot lose a refresh token the provider has "
        "already rotated; a write they do not confirm in time stays written and is counted in "
        "`broker_replication_unconfirmed_total`",
    )
    replica_ack_timeout: Number = Field(
        default=1.0,
        gt=0,
        le=60,
        description="seconds a write waits for those replicas; must be shorter than "
        "`redis_timeout`",
    )
    schedule_shards: Count = Field(
        default=1,
        ge=1,
        le=256,
        description="keys each provider's refresh schedule is spread over; on a Redis Cluster "
        "use 8 to 32 so one provider's schedule is not one hot slot. Changing it strands the "
        "entries of shards that no longer exist until their grants are written again (a "
        "refresh, an import): change it only on an empty store or accept that those grants are "
        "refreshed on demand meanwhile",
    )
    rotated_write_window: Number = Field(
        default=45.0,
        gt=0,
        le=300,
        description="seconds a refresh keeps retrying the write of tokens the provider just "
        "issued while Redis is unreachable; the default covers a Sentinel failover (30 s "
        "detection by default, then the promotion). The caller gets the new access token at "
        "once meanwhile. After the window the tokens are lost "
        "(`broker_rotated_writes_lost_total`) and the grant will need re-authorization",
    )
    lock_ttl: Number = Field(
        default=60.0,
        ge=0.5,
        le=600,
        description="lifetime of a per-grant refresh lock, renewed every quarter of it while "
        "held. A provider call starts only while the lock is certainly held for "
        "`provider_timeout + rotated_write_window` more seconds, so it must be at least "
        "`provider_timeout + rotated_write_window + redis_timeout` (start-up refuses less). A "
        "replica killed with SIGKILL delays the grants it was refreshing by up to this long: see "
        "[operations.md](operations.md#locks-timeouts-and-what-a-stalled-replica-costs)",
    )
    lock_wait_timeout: Number = Field(
        default=20.0,
        gt=0,
        description="how long a request waits for another replica's refresh of the same grant "
        "before it serves the still-valid token or answers 503; it re-reads the grant while it "
        "waits and returns as soon as a fresh-enough token is stored",
    )
    refresh_lead: Number = Field(
        default=300.0,
        ge=0,
        description="refresh this many seconds before expiry (capped at half the token's lifetime)",
    )
    refresh_jitter_max: Number = Field(
        default=60.0,
        ge=0,
        description="up to this much earlier still, at random (capped at a tenth of the lifetime)",
    )
    failures_before_failing: Count = Field(
        default=3,
        ge=1,
        description="consecutive transient refresh failures before a grant shows "
        "`refresh_failing`; a failure that leaves its access token expired shows it at once",
    )
    retry_base: Number = Field(
        default=1.0,
        gt=0,
        description="first retry delay after a transient failure; doubles per consecutive "
        "failure, with full jitter (a random delay between half the base and the ceiling), never "
        "sooner than the provider's `Retry-After`; at most `retry_max`",
    )
    retry_max: Number = Field(default=300.0, gt=0, description="ceiling of the retry delay")
    circuit_failures: Count = Field(
        default=5,
        ge=1,
        description="consecutive transient failures at one provider (per replica) that open its "
        "circuit: no calls to it for `circuit_open_for` seconds, then one probe; success closes "
        "it and makes the provider's `refresh_failing` grants due at once",
    )
    circuit_open_for: Number = Field(
        default=5.0,
        gt=0,
        description="seconds an open circuit waits before probing (with a grant left failing by "
        "the outage, or the next due one)",
    )
    scheduler_enabled: Flag = Field(
        default=True, description="run the background refresher in this process"
    )
    scheduler_concurrency: Count = Field(
        default=32, ge=1, le=4096, description="refreshes one process runs at once"
    )
    provider_concurrency: Count = Field(
        default=8,
        ge=1,
        le=4096,
        description="refreshes one process runs at once against one provider (per-provider "
        "`max_concurrency` overrides)",
    )
    scheduler_lease: Number = Field(
        default=3.0,
        ge=0.5,
        le=300,
        description="seconds a claimed grant is leased to a replica; renewed while its refresh "
        "runs; a dead replica's claims come due again after this",
    )
    scheduler_tick: Number = Field(
        default=0.25, ge=0.01, le=10, description="seconds between looks at the schedule when idle"
    )
    reconcile_interval: Number = Field(
        default=1.0,
        ge=0.01,
        le=3600,
        description="seconds between two reconciler steps: each checks `reconcile_batch` grant "
        "keys (SCAN) against the refresh schedule and the state sets and repairs what a lost "
        "index update left behind (`broker_index_repairs_total`); a full pass takes "
        "`grants / reconcile_batch` steps",
    )
    reconcile_batch: Count = Field(
        default=100,
        ge=1,
        le=10000,
        description="grant keys one reconciler step checks (per replica)",
    )
    key_census_interval: Number = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="seconds between two steps of the census of records per encryption key "
        "(`broker_records_by_key`): each SCANs 1000 keys; a full pass takes `records / 1000` "
        "steps; 0 turns it off",
    )
    refresh_token_warn_before: Number = Field(
        default=86400.0,
        ge=0,
        description="grants whose refresh token reaches the provider's `refresh_token_max_age` "
        "within this many seconds are counted in `broker_refresh_tokens_expiring`",
    )
    store_retry_after: Count = Field(
        default=2, ge=0, description="`Retry-After` seconds on `503 store_unavailable`"
    )
    shutdown_timeout: Number = Field(
        default=15.0,
        ge=0,
        description="the one drain budget after SIGTERM: in-flight requests, then scheduled "
        "refreshes, then writes of issued tokens share it (a rotated token in hand always gets "
        "one more write attempt). Keep it above `provider_timeout`, so a refresh in flight can "
        "finish; the Helm chart sizes `terminationGracePeriodSeconds` from it",
    )
    providers: Mapping[ProviderName, ProviderSettings] = Field(
        default_factory=dict, description="the `[providers.<name>]` tables"
    )
    clients: tuple[ClientSettings, ...] = Field(default=(), description="the `[[clients]]` tables")
    webhooks: tuple[WebhookSettings, ...] = Field(
        default=(), description="the `[[webhooks]]` tables (docs/webhooks.md)"
    )
    # Derived at load time (broker.config): the key ring, and whether it is a throwaway key.
    encryption_keys: Derived[tuple[tuple[str, bytes], ...]] = Field(
        default=(), repr=False, exclude=True
    )
    ephemeral_encryption_key: Derived[bool] = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor arguments, then (while ``build_settings`` loads) its layers: the given
        environment's ``BROKER_*`` over the TOML document; never the process's environment."""
        return (init_settings, *layers())

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str, info: ValidationInfo) -> str:
        if not value and "port" in info.data:
            value = f"http://127.0.0.1:{info.data['port']}"
        return value.rstrip("/")

    @field_validator("providers", mode="before")
    @classmethod
    def _provider_names(cls, value: Any) -> Any:
        """Each ``[providers.<name>]`` table gets its name from the table's key."""
        if not isinstance(value, Mapping):
            return value
        named = {}
        for key, table in value.items():
            if isinstance(table, Mapping):
                if "name" in table:
                    raise setting_error(f"{key}.name", "unknown setting")
                table = {**table, "name": key}
            named[key] = table
        return named

    @model_validator(mode="after")
    def _together(self) -> Self:
        check_together(self)
        return self

    @property
    def redis_url_safe(self) -> str:
        """The Redis URL without its password, for logs and ``check-config``."""
        return without_password(self.redis_url)

    @property
    def is_memory_store(self) -> bool:
        return self.redis_url == MEMORY_URL

    def callback_url(self, provider: str) -> str:
        return f"{self.public_url}/oauth/{provider}/callback"
