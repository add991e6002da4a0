"""The building blocks of the settings models: value types that check themselves, name their
problem in words an operator understands, and say what they accept in the JSON Schema.

A check raises ``ValueError(problem)`` (or :func:`setting_error` to name a setting below the one
being validated); ``broker.config`` turns it into ``ConfigError("<setting>", problem)``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args, get_origin
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    SecretStr,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from broker.errors import ConfigError

PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
KEY_PREFIX = re.compile(r"^[A-Za-z0-9_:.-]{1,64}$")
SHA256_HEX = re.compile(r"^[0-9A-Fa-f]{64}$")  # stored lower-case
MEMORY_URL = "memory://"
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
REDIS_SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME, CLUSTER_SCHEME)
AUTHORIZATION_TTL = 600  # seconds a started authorization (its state) stays usable
MAX_REDIRECT_URL_CHARS = 2048


class Secret(SecretStr):
    """A secret string that never shows itself in ``repr``, ``str`` or f-strings."""

    def reveal(self) -> str:
        return self.get_secret_value()


def setting_error(at: str, problem: str) -> PydanticCustomError:
    """A problem with the setting ``at`` (dotted, relative to the model being validated)."""
    return PydanticCustomError("setting", "{problem}", {"at": at, "problem": problem})


class Check:
    """An after-validation step with a message of its own, and what it adds to the JSON Schema.

    ``test`` returns the value (possibly normalised) or raises ``ValueError(problem)``.
    """

    def __init__(self, test: Callable[[Any], Any], **schema: Any) -> None:
        self.test = test
        self.schema = schema

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.test, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        result = handler(schema)
        result.update(self.schema)
        return result


def matching(
    pattern: re.Pattern[str], problem: str, normalise: Callable[[str], str] = str
) -> Check:
    """A string that matches ``pattern`` (also written into the JSON Schema)."""

    def test(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(problem)
        return normalise(value)

    return Check(test, pattern=pattern.pattern)


@dataclass(frozen=True, slots=True)
class ShownDefault:
    """How the documentation shows a default that is computed or inherited (``public_url``)."""

    text: str


# A field marked ``Derived[...]`` is derived at load time, not a setting: no TOML key, no
# variable, not in the JSON Schema or the documentation.
if TYPE_CHECKING:
    _T = TypeVar("_T")
    Derived = Annotated[_T, "derived"]
else:
    Derived = SkipJsonSchema


def is_table(field: FieldInfo) -> bool:
    """Whether a setting holds tables of its own (``providers``, ``clients``), not values."""
    origin, args = get_origin(field.annotation), get_args(field.annotation)
    return any(isinstance(arg, type) and issubclass(arg, BaseModel) for arg in args) or (
        isinstance(origin, type) and issubclass(origin, Mapping)
    )


def settings_of(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields of ``model`` that are settings (all but the ``Derived`` ones), in order."""
    return {
        name: field
        for name, field in model.model_fields.items()
        if not any(isinstance(item, SkipJsonSchema) for item in field.metadata)  # type: ignore[misc]
    }


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number, not {value!r}")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except ValueError as err:
        raise ValueError(f"must be a number, not {value!r}") from err
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, not {value!r}")
    return number


def _whole(value: Any) -> int:
    number = _number(value)
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"must be a whole number, not {value!r}")
        return int(number)
    return number


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ValueError("must be true or false")


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# Numbers from TOML or the environment ("8080"): finite, and whole where counted; never a bool.
Number = Annotated[float, BeforeValidator(_number)]
Count = Annotated[int, BeforeValidator(_whole)]
Flag = Annotated[bool, BeforeValidator(_flag)]  # true/false; "true", "false", "1", "0" too
CaseInsensitive = BeforeValidator(_lower)


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError("must be a non-empty string")
    return value


def _nonempty_secret(value: Secret) -> Secret:
    if not value.reveal():
        raise ValueError("must be a non-empty string")
    return value


Text = Annotated[str, Check(_nonempty, minLength=1)]
SecretText = Annotated[Secret, Check(_nonempty_secret, minLength=1)]


def absolute_http_url(value: str) -> str:
    """``value`` if it is an absolute http(s) URL; ValueError otherwise."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an absolute http(s) URL")
    return value


def _allowlist_entry(value: str) -> str:
    """Redirect allow-list entries: absolute http(s) URLs without credentials, query or
    fragment, so that matching compares scheme, host, port and a path prefix only."""
    entry = absolute_http_url(value.strip())
    parts = urlsplit(entry)
    if "@" in parts.netloc or parts.query or parts.fragment or "\\" in entry:
        raise ValueError(f"{entry!r}: no user info, query or fragment")
    return entry


def _url_or_empty(value: str) -> str:
    return absolute_http_url(value) if value else value


HttpUrl = Annotated[str, Check(absolute_http_url, format="uri", pattern="^https?://")]
AllowlistEntry = Annotated[str, Check(_allowlist_entry, format="uri", pattern="^https?://")]
UrlOrEmpty = Annotated[str, Check(_url_or_empty, pattern="^(https?://[^/]+.*)?$")]


def insecure_url_problem(value: str, insecure: bool) -> str | None:
    """Why a provider endpoint is refused: plain http to a host that is not loopback, unless
    ``insecure``; None when it is usable."""
    parts = urlsplit(value)
    if parts.scheme == "http" and not insecure and not _is_loopback(parts.hostname or ""):
        return "must be https (set allow_insecure_http = true for a dev provider)"
    return None


def provider_url(name: str, value: Any, insecure: bool) -> str:
    """``value`` if it is a usable provider endpoint: https, or http on loopback or when
    ``insecure``; ConfigError naming ``name`` otherwise."""
    if not isinstance(value, str):
        raise ConfigError(name, "must be a URL string")
    try:
        absolute_http_url(value)
    except ValueError as err:
        raise ConfigError(name, str(err)) from None
    problem = insecure_url_problem(value, insecure)
    if problem is not None:
        raise ConfigError(name, problem)
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None = dataclasses.field(repr=False)


def _addresses(netloc: str) -> tuple[tuple[str, int], ...]:
    _, _, hosts = netloc.rpartition("@")
    addresses = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError("addresses must be host:port[,host:port]")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)


def _cluster_nodes(url: str) -> tuple[tuple[tuple[str, int], ...], str | None]:
    parts = urlsplit(url)
    if parts.path.strip("/"):
        raise ValueError("a Redis Cluster has no database number or path")
    return _addresses(parts.netloc), parts.password


def _sentinel_target(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    sentinels = _addresses(parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("give the sentinel service name (and db): .../mymaster/0")
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelTarget(sentinels, path[0], db, parts.password)


def cluster_nodes(url: str) -> tuple[tuple[tuple[str, int], ...], str | None]:
    """Parse ``redis+cluster://[:password@]host:port[,host:port]``: seed nodes, password."""
    try:
        return _cluster_nodes(url)
    except ValueError as err:
        raise ConfigError("redis_url", str(err)) from None


def sentinel_target(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[:password@]host:port[,host:port]/service[/db]``."""
    try:
        return _sentinel_target(url)
    except ValueError as err:
        raise ConfigError("redis_url", str(err)) from None


def without_password(url: str) -> str:
    """``url`` without its password (in the userinfo or a ``password=`` query parameter, both
    of which redis-py reads)."""
    parts = urlsplit(url)
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


def _redis_url(value: str) -> str:
    if value == MEMORY_URL:
        return value
    scheme = urlsplit(value).scheme
    if scheme not in REDIS_SCHEMES:
        raise ValueError(
            "must be memory://, redis://, rediss://, unix:// or "
            "redis+sentinel://host:port[,host:port]/service[/db] or "
            "redis+cluster://host:port[,host:port]"
        )
    if scheme == SENTINEL_SCHEME:
        _sentinel_target(value)
    if scheme == CLUSTER_SCHEME:
        _cluster_nodes(value)
    return value


RedisUrl = Annotated[
    str,
    Check(
        _redis_url,
        format="uri",
        pattern=r"^(memory|redis|rediss|unix|redis\+sentinel|redis\+cluster)://",
    ),
]
