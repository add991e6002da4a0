"""Settings: a TOML file plus ``BROKER_*`` environment overrides, validated once at start-up.

The settings are defined once, as typed models with their defaults, constraints and
descriptions, in :mod:`broker.settings_model` (top level) and :mod:`broker.settings_providers`
(``[providers.<name>]``, ``[[clients]]``); read its docstring to add a setting. This module
loads them: pydantic-settings layers the environment's ``BROKER_<NAME>`` over the TOML
document, validation problems become a :class:`ConfigError` that names the setting (or the
variable it came from), and referenced secrets are read (:mod:`broker.settings_secrets`).
Secrets are :class:`Secret` values or fields hidden from ``repr``, so no log shows them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from broker.errors import ConfigError
from broker.settings_layers import layered
from broker.settings_model import Settings
from broker.settings_providers import (
    CLIENT_AUTH_METHODS,
    PERMISSIONS,
    ClientSettings,
    ProviderSettings,
)
from broker.settings_secrets import (
    client_secrets,
    encryption_keys,
    parse_encryption_keys,
    webhook_secrets,
)
from broker.settings_types import (
    AUTHORIZATION_TTL,
    CLUSTER_SCHEME,
    KEY_ID,
    KEY_PREFIX,
    MAX_REDIRECT_URL_CHARS,
    MEMORY_URL,
    PROVIDER_NAME,
    SENTINEL_SCHEME,
    SHA256_HEX,
    Secret,
    SentinelTarget,
    cluster_nodes,
    is_table,
    provider_url,
    sentinel_target,
    settings_of,
)
from broker.tls import checked_ca_bundle

__all__ = [
    "AUTHORIZATION_TTL",
    "CLIENT_AUTH_METHODS",
    "CLUSTER_SCHEME",
    "KEY_ID",
    "KEY_PREFIX",
    "MAX_REDIRECT_URL_CHARS",
    "MEMORY_URL",
    "PERMISSIONS",
    "PROVIDER_NAME",
    "SENTINEL_SCHEME",
    "SHA256_HEX",
    "ClientSettings",
    "ProviderSettings",
    "Secret",
    "SentinelTarget",
    "Settings",
    "build_settings",
    "cluster_nodes",
    "load_settings",
    "parse_encryption_keys",
    "provider_url",
    "sentinel_target",
]


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
    """Validate a parsed TOML document merged with the environment (which wins), then read the
    secrets it references; file paths are relative to ``base_dir``."""
    for key in raw:
        if key in Settings.model_fields and key not in settings_of(Settings):
            raise ConfigError(key, "unknown setting")  # derived at load time, never configured
    environment = Environment(Settings, environ)
    try:
        with layered(environment, Document(Settings, raw)):
            settings = Settings()
    except ValidationError as err:
        raise _config_error(err, environment.variables, raw) from None
    providers = client_secrets(settings.providers, environ, base_dir)
    webhooks = webhook_secrets(settings.webhooks, environ, base_dir)
    file_setting = environment.variables.get("encryption_keys_file", "encryption_keys_file")
    keys, ephemeral = encryption_keys(settings, environ, base_dir, file_setting)
    ca_setting = environment.variables.get("ca_bundle", "ca_bundle")
    return settings.model_copy(
        update={
            "ca_bundle": checked_ca_bundle(ca_setting, settings.ca_bundle, base_dir),
            "providers": providers,
            "webhooks": webhooks,
            "encryption_keys": keys,
            "ephemeral_encryption_key": ephemeral,
        }
    )


class Document(PydanticBaseSettingsSource):
    """A parsed TOML document (``TomlConfigSettingsSource`` reads a file itself, and would
    take a missing file for an empty one)."""

    def __init__(self, settings_cls: type[BaseSettings], document: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self.document = dict(document)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.document.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.document)


class Environment(PydanticBaseSettingsSource):
    """``BROKER_<NAME>`` for each top-level setting but the tables, from a given environment;
    a list is comma-separated. ``variables`` maps each setting found to its variable."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        prefix = self.config.get("env_prefix", "")
        self.variables: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        for name, field in settings_of(settings_cls).items():
            form = _environment_form(field)
            variable = f"{prefix}{name.upper()}"
            if form is None or variable not in environ:
                continue
            self.variables[name] = variable
            text = environ[variable]
            self.values[name] = text.split(",") if form == "list" else text

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def _environment_form(field: FieldInfo) -> Literal["text", "list"] | None:
    """How a setting is written in one variable; None for the tables (providers, clients)."""
    if is_table(field):
        return None
    return "list" if get_origin(field.annotation) is tuple else "text"


_PROBLEMS = {
    "extra_forbidden": "unknown setting",
    "missing": "required",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "set_type": "must be a list",
    "frozen_set_type": "must be a list",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be one of {expected}",
}


def _config_error(
    err: ValidationError, variables: Mapping[str, str], raw: Mapping[str, Any]
) -> ConfigError:
    """The first problem (an unknown setting before the others), named by its setting."""
    error = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    return ConfigError(_setting(error, variables, raw), _problem(error))


def _problem(error: ErrorDetails) -> str:
    context = error.get("ctx", {})
    if error["type"] == "setting":
        return str(context["problem"])
    if error["type"] in ("value_error", "assertion_error"):
        return str(context["error"])
    if error["type"] in _PROBLEMS:
        return _PROBLEMS[error["type"]].format(**context)
    return error["msg"]


def _setting(error: ErrorDetails, variables: Mapping[str, str], raw: Mapping[str, Any]) -> str:
    """``providers.alfresco.token_url``, ``clients.billing.providers``, or the variable."""
    loc = error["loc"]
    if loc and loc[0] in variables:
        return variables[str(loc[0])]
    path: list[str] = []
    for index, part in enumerate(loc):
        if index == 1 and loc[0] in ("clients", "webhooks") and isinstance(part, int):
            path[-1] = _client(raw, part, str(loc[0]))
        elif isinstance(part, str) and part != "[key]":
            path.append(part)  # list items, set members and dict keys are their setting's
    if error["type"] == "setting":
        path.append(str(error.get("ctx", {})["at"]))
    return ".".join(path)


def _client(raw: Mapping[str, Any], index: int, tables: str = "clients") -> str:
    """``clients.<name>`` once a client has a name, ``clients[<index>]`` before (and so for
    ``webhooks``)."""
    clients = raw.get(tables)
    table = clients[index] if isinstance(clients, list) and index < len(clients) else None
    name = table.get("name") if isinstance(table, dict) else None
    return f"{tables}.{name}" if isinstance(name, str) and name else f"{tables}[{index}]"
