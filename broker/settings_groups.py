"""The top-level settings of broker.toml by topic, one class each; :class:`Settings`
(``broker.settings_model``) inherits them in this order, which is the order of the
documentation's table. What ``broker.settings_model`` says about adding a setting holds here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from broker.settings_types import (
    AUTHORIZATION_TTL,
    KEY_PREFIX,
    MEMORY_URL,
    AllowlistEntry,
    CaseInsensitive,
    Count,
    Flag,
    Number,
    RedisUrl,
    ShownDefault,
    Text,
    UrlOrEmpty,
    matching,
)

LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], CaseInsensitive]


class ServiceSettings(BaseModel):
    """Where broker listens and stores, its keys, its logs, and the limits of its API."""

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


class ConnectionSettings(BaseModel):
    """Calls to providers and to Redis: timeouts, pools, the grant cache and record format."""

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
        description="the format grant records are written in: 2, compact (MessagePack, about a "
        "third of format 1's size); 1, JSON, the only one broker 0.1.0 reads. Every version since "
        "reads both: set 1 while replicas of 0.1.0 still run, 2 once none do "
        "(see [operations.md](operations.md#upgrading-from-010))",
    )
    events_max_len: Count = Field(
        default=100000,
        ge=1000,
        le=100000000,
        description="entries the events stream (webhooks, docs/webhooks.md) keeps, about (`XADD "
        "MAXLEN ~`); a few hundred bytes each. Trimming does not wait for receivers: one that "
        "falls further behind than this loses the oldest events",
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


class RefreshSettings(BaseModel):
    """When and how grants are refreshed, retried, locked, scheduled and reconciled, and how
    long a shutdown may take."""

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
