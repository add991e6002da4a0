"""Settings: a TOML file plus ``BROKER_*`` environment overrides, validated once at start-up.

Every limit and timeout lives here as a named default so operators can tune it and code never
hides a magic number. Secrets are wrapped in :class:`Secret` so no ``repr`` or log shows them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from broker.errors import ConfigError

PERMISSIONS = frozenset({"tokens:read", "grants:write", "grants:read"})
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
KEY_PREFIX = re.compile(r"^[A-Za-z0-9_:.-]{1,64}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MEMORY_URL = "memory://"
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
AUTHORIZATION_TTL = 600  # seconds a started authorization (its state) stays usable
MAX_REDIRECT_URL_CHARS = 2048


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string that never shows itself in ``repr``, ``str`` or f-strings."""

    value: str = field(repr=False)

    def reveal(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    # "" only until start-up discovery fills it from ``issuer`` / ``discovery_url``
    token_url: str
    client_id: str
    client_secret: Secret | None = None
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    authorize_url: str | None = None
    revocation_url: str | None = None
    scopes: tuple[str, ...] = ()
    default_expires_in: int = 3600
    pkce: bool = True
    refresh_token_max_age: int | None = None
    max_concurrency: int | None = None
    reauth_errors: tuple[str, ...] = ("invalid_grant",)
    allow_insecure_http: bool = False
    required_scopes: tuple[str, ...] = ()  # always requested, even when a client names a scope
    redirect_allowlist: tuple[str, ...] = ()  # extends the top-level redirect_allowlist
    issuer: str | None = None  # OIDC discovery: {issuer}/.well-known/openid-configuration
    discovery_url: str | None = None  # or the metadata document's URL itself

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


@dataclass(frozen=True, slots=True)
class ClientSettings:
    name: str
    key_sha256: str = field(repr=False)
    providers: tuple[str, ...]
    permissions: frozenset[str]

    def may_use(self, provider: str) -> bool:
        return "*" in self.providers or provider in self.providers


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = field(default=MEMORY_URL, repr=False)
    host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on all interfaces
    port: int = 8080
    public_url: str = ""
    redirect_allowlist: tuple[str, ...] = ()
    key_prefix: str = "broker"
    encryption_keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    ephemeral_encryption_key: bool = False
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    # limits and timeouts (seconds unless named otherwise)
    max_body_bytes: int = 64 * 1024
    default_min_ttl: int = 30
    max_min_ttl: int = 3600
    provider_timeout: float = 10.0
    provider_connect_timeout: float = 5.0
    provider_max_response_bytes: int = 256 * 1024
    redis_timeout: float = 2.0
    redis_max_connections: int = 64
    min_replicas_to_ack: int = 0
    schedule_shards: int = 1
    replica_ack_timeout: float = 1.0
    rotated_write_window: float = 45.0
    lock_ttl: float = 60.0
    lock_wait_timeout: float = 20.0
    refresh_lead: float = 300.0
    refresh_jitter_max: float = 60.0
    failures_before_failing: int = 3
    retry_base: float = 1.0
    retry_max: float = 300.0
    circuit_failures: int = 5
    circuit_open_for: float = 5.0
    scheduler_enabled: bool = True
    scheduler_concurrency: int = 32
    provider_concurrency: int = 8
    scheduler_lease: float = 3.0
    scheduler_tick: float = 0.25
    refresh_token_warn_before: float = 86400.0
    reconcile_interval: float = 1.0
    reconcile_batch: int = 100
    store_retry_after: int = 2
    shutdown_timeout: float = 15.0
    authorization_ttl: int = AUTHORIZATION_TTL
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    clients: tuple[ClientSettings, ...] = ()

    @property
    def redis_url_safe(self) -> str:
        """The Redis URL without its password (in the userinfo or a ``password=`` query
        parameter, both of which redis-py reads), for logs and ``check-config``."""
        parts = urlsplit(self.redis_url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if colon else f"***@{host}"
        query = "&".join(
            f"{name}=***" if name.lower() == "password" else f"{name}={value}"
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        )
        return parts._replace(netloc=netloc, query=query).geturl()

    @property
    def is_memory_store(self) -> bool:
        return self.redis_url == MEMORY_URL

    def callback_url(self, provider: str) -> str:
        return f"{self.public_url}/oauth/{provider}/callback"


# Top-level settings that may come from the file and from BROKER_<NAME>, with their types.
_SCALARS: dict[str, type] = {
    "redis_url": str,
    "host": str,
    "port": int,
    "public_url": str,
    "key_prefix": str,
    "log_format": str,
    "log_level": str,
    "max_body_bytes": int,
    "default_min_ttl": int,
    "max_min_ttl": int,
    "provider_timeout": float,
    "provider_connect_timeout": float,
    "provider_max_response_bytes": int,
    "redis_timeout": float,
    "redis_max_connections": int,
    "min_replicas_to_ack": int,
    "schedule_shards": int,
    "replica_ack_timeout": float,
    "rotated_write_window": float,
    "lock_ttl": float,
    "lock_wait_timeout": float,
    "refresh_lead": float,
    "refresh_jitter_max": float,
    "failures_before_failing": int,
    "store_retry_after": int,
    "shutdown_timeout": float,
    "retry_base": float,
    "retry_max": float,
    "circuit_failures": int,
    "circuit_open_for": float,
    "scheduler_enabled": bool,
    "scheduler_concurrency": int,
    "provider_concurrency": int,
    "scheduler_lease": float,
    "scheduler_tick": float,
    "refresh_token_warn_before": float,
    "reconcile_interval": float,
    "reconcile_batch": int,
    "authorization_ttl": int,
}


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None = field(repr=False)


def _addresses(netloc: str) -> tuple[tuple[str, int], ...]:
    _, _, hosts = netloc.rpartition("@")
    addresses = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ConfigError("redis_url", "addresses must be host:port[,host:port]")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)


def cluster_nodes(url: str) -> tuple[tuple[tuple[str, int], ...], str | None]:
    """Parse ``redis+cluster://[:password@]host:port[,host:port]``: seed nodes, password."""
    parts = urlsplit(url)
    if parts.path.strip("/"):
        raise ConfigError("redis_url", "a Redis Cluster has no database number or path")
    return _addresses(parts.netloc), parts.password


def sentinel_target(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[:password@]host:port[,host:port]/service[/db]``."""
    parts = urlsplit(url)
    password = parts.password
    sentinels = _addresses(parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError("redis_url", "give the sentinel service name (and db): .../mymaster/0")
    return SentinelTarget(
        tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, password
    )


def load_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Settings:
    """Read, merge and validate settings; raises ConfigError naming the first bad setting."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError("config", f"file not found: {path}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("config", f"{path} is not valid TOML: {err}") from err
    return build_settings(raw, environ, base_dir=Path(path).parent if path else Path.cwd())


def build_settings(raw: Mapping[str, Any], environ: Mapping[str, str], base_dir: Path) -> Settings:
    """Validate a parsed TOML document merged with the environment."""
    raw = dict(raw)
    known = {f.name for f in fields(Settings)} - {"encryption_keys", "ephemeral_encryption_key"}
    known |= {"encryption_keys_file", "encryption_keys_env"}
    for key in raw:
        if key not in known:
            raise ConfigError(key, "unknown setting")
    values: dict[str, Any] = {}
    for name, kind in _SCALARS.items():
        env_name = f"BROKER_{name.upper()}"
        if env_name in environ:
            values[name] = _coerce(env_name, environ[env_name], kind)
        elif name in raw:
            values[name] = _coerce(name, raw[name], kind)
    allow = environ.get("BROKER_REDIRECT_ALLOWLIST")
    allowlist = allow.split(",") if allow is not None else raw.get("redirect_allowlist", [])
    values["redirect_allowlist"] = _allowlist("redirect_allowlist", allowlist)
    values["providers"] = _providers(raw.get("providers", {}), environ, base_dir)
    values["clients"] = _clients(raw.get("clients", []), values["providers"])
    settings = Settings(**values)
    _check_ranges(settings)
    keys, ephemeral = _encryption_keys(raw, environ, base_dir, settings.is_memory_store)
    port = settings.port
    public_url = (settings.public_url or f"http://127.0.0.1:{port}").rstrip("/")
    _url("public_url", public_url)
    return _replace(
        settings, encryption_keys=keys, ephemeral_encryption_key=ephemeral, public_url=public_url
    )


def parse_encryption_keys(
    text: str, setting: str = "BROKER_ENCRYPTION_KEYS"
) -> tuple[tuple[str, bytes], ...]:
    """Parse ``"k2:<base64 32 bytes>,k1:<base64>"``; the first key encrypts new writes."""
    keys: list[tuple[str, bytes]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kid, sep, material = item.partition(":")
        if not sep or not KEY_ID.match(kid):
            raise ConfigError(setting, "each key must be '<id>:<base64 of 32 bytes>'")
        try:
            key = base64.b64decode(material, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ConfigError(setting, f"key {kid!r} is not valid base64") from err
        if len(key) != 32:
            raise ConfigError(setting, f"key {kid!r} must be 32 bytes, not {len(key)}")
        if any(kid == seen for seen, _ in keys):
            raise ConfigError(setting, f"key id {kid!r} appears twice")
        keys.append((kid, key))
    if not keys:
        raise ConfigError(setting, "no key given")
    return tuple(keys)


def _encryption_keys(
    raw: Mapping[str, Any], environ: Mapping[str, str], base_dir: Path, memory: bool
) -> tuple[tuple[tuple[str, bytes], ...], bool]:
    env_name = str(raw.get("encryption_keys_env", "BROKER_ENCRYPTION_KEYS"))
    if env_name in environ:  # set but empty is a mistake (a missing secret key), not "none"
        return parse_encryption_keys(environ[env_name], env_name), False
    if "encryption_keys_file" in raw:
        text = _read_secret_file("encryption_keys_file", raw["encryption_keys_file"], base_dir)
        return parse_encryption_keys(text, "encryption_keys_file"), False
    if memory:
        return (("ephemeral", os.urandom(32)),), True
    raise ConfigError(
        "BROKER_ENCRYPTION_KEYS", "required with a Redis store (make one with `broker keygen`)"
    )


def _providers(raw: Any, environ: Mapping[str, str], base_dir: Path) -> dict[str, ProviderSettings]:
    if not isinstance(raw, dict):
        raise ConfigError("providers", "must be a table of [providers.<name>]")
    result: dict[str, ProviderSettings] = {}
    for name, table in raw.items():
        where = f"providers.{name}"
        if not PROVIDER_NAME.match(name):
            raise ConfigError(where, "name must match [a-z0-9][a-z0-9_-]{0,62}")
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        allowed = {f.name for f in fields(ProviderSettings)} - {"name", "client_secret"}
        allowed |= {"client_secret", "client_secret_env", "client_secret_file"}
        for key in table:
            if key not in allowed:
                raise ConfigError(f"{where}.{key}", "unknown setting")
        insecure = _bool(f"{where}.allow_insecure_http", table.get("allow_insecure_http", False))
        urls = {}
        for key in ("token_url", "authorize_url", "revocation_url", "issuer", "discovery_url"):
            if key in table:
                urls[key] = provider_url(f"{where}.{key}", table[key], insecure)
        if "token_url" not in urls:
            if "issuer" not in urls and "discovery_url" not in urls:
                raise ConfigError(f"{where}.token_url", "required (or issuer / discovery_url)")
            urls["token_url"] = ""  # discovered at start-up
        client_id = table.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise ConfigError(f"{where}.client_id", "required, a non-empty string")
        auth = table.get("client_auth", "client_secret_basic")
        if auth not in CLIENT_AUTH_METHODS:
            raise ConfigError(f"{where}.client_auth", f"must be one of {CLIENT_AUTH_METHODS}")
        default_expires = _coerce(
            f"{where}.default_expires_in", table.get("default_expires_in", 3600), int
        )
        if not 1 <= default_expires <= 366 * 86400:
            raise ConfigError(f"{where}.default_expires_in", "must be 1 s to 366 days")
        max_age = table.get("refresh_token_max_age")
        concurrency = table.get("max_concurrency")
        result[name] = ProviderSettings(
            name=name,
            client_id=client_id,
            client_secret=_client_secret(where, table, environ, base_dir),
            client_auth=auth,
            scopes=tuple(_str_list(f"{where}.scopes", table.get("scopes", []))),
            default_expires_in=default_expires,
            pkce=_bool(f"{where}.pkce", table.get("pkce", True)),
            refresh_token_max_age=(
                None if max_age is None else _coerce(f"{where}.refresh_token_max_age", max_age, int)
            ),
            max_concurrency=(
                None
                if concurrency is None
                else _coerce(f"{where}.max_concurrency", concurrency, int)
            ),
            reauth_errors=tuple(
                _str_list(f"{where}.reauth_errors", table.get("reauth_errors", ["invalid_grant"]))
            ),
            allow_insecure_http=insecure,
            required_scopes=tuple(
                _str_list(f"{where}.required_scopes", table.get("required_scopes", []))
            ),
            redirect_allowlist=_allowlist(
                f"{where}.redirect_allowlist", table.get("redirect_allowlist", [])
            ),
            **urls,
        )
    return result


def _client_secret(
    where: str, table: Mapping[str, Any], environ: Mapping[str, str], base_dir: Path
) -> Secret | None:
    given = [k for k in ("client_secret", "client_secret_env", "client_secret_file") if k in table]
    if len(given) > 1:
        raise ConfigError(f"{where}.{given[1]}", f"give only one of {', '.join(given)}")
    if not given:
        return None
    key = given[0]
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}", "must be a non-empty string")
    if key == "client_secret_env":
        if not environ.get(value):
            raise ConfigError(f"{where}.{key}", f"environment variable {value} is not set")
        return Secret(environ[value])
    if key == "client_secret_file":
        return Secret(_read_secret_file(f"{where}.{key}", value, base_dir))
    return Secret(value)


def _clients(raw: Any, providers: Mapping[str, ProviderSettings]) -> tuple[ClientSettings, ...]:
    if not isinstance(raw, list):
        raise ConfigError("clients", "must be an array of [[clients]] tables")
    result: list[ClientSettings] = []
    for index, table in enumerate(raw):
        where = f"clients[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        for key in table:
            if key not in {"name", "key_sha256", "providers", "permissions"}:
                raise ConfigError(f"{where}.{key}", "unknown setting")
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name", "required, a non-empty string")
        where = f"clients.{name}"
        digest = str(table.get("key_sha256", "")).lower()
        if not SHA256_HEX.match(digest):
            raise ConfigError(f"{where}.key_sha256", "must be 64 hex digits (see `broker apikey`)")
        allowed = tuple(_str_list(f"{where}.providers", table.get("providers", [])))
        if not allowed:
            raise ConfigError(f"{where}.providers", 'required: provider names or ["*"]')
        for provider in allowed:
            if provider != "*" and provider not in providers:
                raise ConfigError(f"{where}.providers", f"unknown provider {provider!r}")
        permissions = frozenset(_str_list(f"{where}.permissions", table.get("permissions", [])))
        if not permissions or not permissions <= PERMISSIONS:
            raise ConfigError(f"{where}.permissions", f"choose from {sorted(PERMISSIONS)}")
        if any(c.name == name for c in result):
            raise ConfigError(where, "client name appears twice")
        if any(c.key_sha256 == digest for c in result):
            raise ConfigError(f"{where}.key_sha256", "the same key is configured twice")
        result.append(ClientSettings(name, digest, allowed, permissions))
    return tuple(result)


def _check_ranges(s: Settings) -> None:
    checks: list[tuple[str, bool, str]] = [
        ("port", 0 <= s.port <= 65535, "must be 0..65535"),
        ("key_prefix", bool(KEY_PREFIX.match(s.key_prefix)), "must match [A-Za-z0-9_:.-]{1,64}"),
        ("log_format", s.log_format in ("auto", "json", "console"), "auto, json or console"),
        ("log_level", s.log_level.lower() in _LEVELS, f"one of {sorted(_LEVELS)}"),
        ("max_body_bytes", 1024 <= s.max_body_bytes <= 16 << 20, "must be 1 KiB..16 MiB"),
        ("default_min_ttl", 0 <= s.default_min_ttl <= s.max_min_ttl, "must be 0..max_min_ttl"),
        ("provider_timeout", 0 < s.provider_timeout <= 120, "must be in (0, 120]"),
        ("provider_connect_timeout", 0 < s.provider_connect_timeout <= 60, "must be in (0, 60]"),
        ("redis_timeout", 0 < s.redis_timeout <= 60, "must be in (0, 60]"),
        ("redis_max_connections", 1 <= s.redis_max_connections <= 10000, "must be 1..10000"),
        ("min_replicas_to_ack", 0 <= s.min_replicas_to_ack <= 16, "must be 0..16"),
        ("schedule_shards", 1 <= s.schedule_shards <= 256, "must be 1..256"),
        ("replica_ack_timeout", 0 < s.replica_ack_timeout <= 60, "must be in (0, 60]"),
        ("rotated_write_window", 0 < s.rotated_write_window <= 300, "must be in (0, 300]"),
        ("lock_ttl", 0.5 <= s.lock_ttl <= 600, "must be 0.5..600 (it is renewed while held)"),
        ("lock_wait_timeout", s.lock_wait_timeout > 0, "must be positive"),
        ("refresh_lead", s.refresh_lead >= 0, "must be >= 0"),
        ("refresh_jitter_max", s.refresh_jitter_max >= 0, "must be >= 0"),
        ("failures_before_failing", s.failures_before_failing >= 1, "must be >= 1"),
        ("shutdown_timeout", s.shutdown_timeout >= 0, "must be >= 0"),
        ("retry_base", 0 < s.retry_base <= s.retry_max, "must be in (0, retry_max]"),
        ("circuit_failures", s.circuit_failures >= 1, "must be >= 1"),
        ("circuit_open_for", s.circuit_open_for > 0, "must be positive"),
        ("scheduler_concurrency", 1 <= s.scheduler_concurrency <= 4096, "must be 1..4096"),
        ("provider_concurrency", 1 <= s.provider_concurrency <= 4096, "must be 1..4096"),
        ("scheduler_lease", 0.5 <= s.scheduler_lease <= 300, "must be 0.5..300"),
        ("scheduler_tick", 0.01 <= s.scheduler_tick <= 10, "must be 0.01..10"),
        ("authorization_ttl", 60 <= s.authorization_ttl <= 3600, "must be 60..3600"),
        ("reconcile_interval", 0.01 <= s.reconcile_interval <= 3600, "must be 0.01..3600"),
        ("reconcile_batch", 1 <= s.reconcile_batch <= 10000, "must be 1..10000"),
    ]
    for setting, ok, problem in checks:
        if not ok:
            raise ConfigError(setting, problem)
    _check_relations(s)
    if not s.is_memory_store:
        scheme = urlsplit(s.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix", SENTINEL_SCHEME, CLUSTER_SCHEME):
            raise ConfigError(
                "redis_url",
                "must be memory://, redis://, rediss://, unix:// or "
                "redis+sentinel://host:port[,host:port]/service[/db] or "
                "redis+cluster://host:port[,host:port]",
            )
        if scheme == SENTINEL_SCHEME:
            sentinel_target(s.redis_url)
        if scheme == CLUSTER_SCHEME:
            cluster_nodes(s.redis_url)


def _check_relations(s: Settings) -> None:
    """Settings that are only safe together (docs/operations.md, "Locks and timeouts")."""
    held = s.provider_timeout + s.rotated_write_window + s.redis_timeout
    if s.lock_ttl < held:
        raise ConfigError(
            "lock_ttl",
            f"must be at least provider_timeout + rotated_write_window + redis_timeout "
            f"(= {held:g}): a refresh holds its lock through the provider call and the write of "
            "its result, or another replica could present the same refresh token",
        )
    if s.min_replicas_to_ack and s.replica_ack_timeout >= s.redis_timeout:
        raise ConfigError(
            "replica_ack_timeout",
            f"must be shorter than redis_timeout ({s.redis_timeout:g}): WAIT blocks its "
            "connection that long, and the command would time out first",
        )
    if s.min_replicas_to_ack and urlsplit(s.redis_url).scheme == CLUSTER_SCHEME:
        raise ConfigError(
            "min_replicas_to_ack",
            "is not supported with redis+cluster (WAIT would have to run on each grant's node); "
            "use 0, or a Sentinel-managed Redis",
        )


_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        return _bool(name, value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(name, "must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(name, f"must be a number, not {value!r}")
    try:
        number = float(value)
    except ValueError as err:
        raise ConfigError(name, f"must be a number, not {value!r}") from err
    if not math.isfinite(number):
        raise ConfigError(name, f"must be a finite number, not {value!r}")
    if kind is int:
        if not number.is_integer():
            raise ConfigError(name, f"must be a whole number, not {value!r}")
        return int(number)
    return number


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, "must be true or false")
    return value


def _str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(name, "must be a list of non-empty strings")
    return value


def _url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"{value!r} is not an absolute http(s) URL")
    return value


def _allowlist(name: str, value: Any) -> tuple[str, ...]:
    """Redirect allow-list entries: absolute http(s) URLs without credentials, query or
    fragment, so that matching compares scheme, host, port and a path prefix only."""
    entries = []
    for raw in _str_list(name, value):
        entry = _url(name, raw.strip())
        parts = urlsplit(entry)
        if "@" in parts.netloc or parts.query or parts.fragment or "\\" in entry:
            raise ConfigError(name, f"{entry!r}: no user info, query or fragment")
        entries.append(entry)
    return tuple(entries)


def provider_url(name: str, value: Any, insecure: bool) -> str:
    """``value`` if it is a usable provider endpoint: https, or http on loopback or when
    ``insecure``; ConfigError naming ``name`` otherwise."""
    if not isinstance(value, str):
        raise ConfigError(name, "must be a URL string")
    _url(name, value)
    host = urlsplit(value).hostname or ""
    if urlsplit(value).scheme == "http" and not insecure and not _is_loopback(host):
        raise ConfigError(name, "must be https (set allow_insecure_http = true for a dev provider)")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_secret_file(name: str, value: Any, base_dir: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(name, "must be a file path")
    path = base_dir / value
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(name, f"cannot read {path}: {err.strerror}") from err
    if not text:
        raise ConfigError(name, f"{path} is empty")
    return text


def _replace(settings: Settings, **changes: Any) -> Settings:
    values = {f.name: getattr(settings, f.name) for f in fields(Settings)}
    values.update(changes)
    return Settings(**values)
