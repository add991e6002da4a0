"""What is generated from the settings models, so that it never drifts from them:

- the JSON Schema of broker.toml (``broker config-schema``);
- the settings tables of docs/configuration.md, each between ``<!-- settings:begin NAME -->``
  and ``<!-- settings:end -->`` (NAME: ``top``, ``providers``, ``clients`` or ``webhooks``);
  the prose around them is written by hand and kept;
- the ``config`` object of helm/broker/values.schema.json: broker's top-level settings that the
  chart passes through to broker.toml (all but the ones the chart sets itself, which it refuses);
- its ``clients`` array: broker's client settings with their rules;
- its ``providers`` object: for each provider, broker's provider settings (all but an inline
  ``client_secret``, which the chart refuses) with their rules, plus the chart's own keys
  (``clientSecret``, ``public``); and its ``webhooks`` list likewise (``signingSecret``). The
  chart's additions are defined here, not in the file.

Regenerate after changing a setting (tests/test_settings_generated.py fails until you do)::

    python -m broker.settings_docs            # rewrite both files
    python -m broker.settings_docs --check    # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema

from broker.settings_model import Settings
from broker.settings_providers import ClientSettings, ProviderSettings, RateLimit
from broker.settings_types import ShownDefault, is_table, settings_of
from broker.settings_webhooks import WebhookSettings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "configuration.md"
CHART_SCHEMA = ROOT / "helm" / "broker" / "values.schema.json"
REGENERATE = "python -m broker.settings_docs"
TABLES: dict[str, type[BaseModel]] = {
    "top": Settings,
    "providers": ProviderSettings,
    "clients": ClientSettings,
    "rate_limit": RateLimit,
    "webhooks": WebhookSettings,
}
# Set by the chart itself (listen address and port, Redis, the mounted key file), so refused in
# its `config` value; providers and clients have values of their own.
CHART_OWNED = ("host", "port", "redis_url", "encryption_keys_file", "encryption_keys_env")
# The chart's own keys in a provider's value, never written to broker.toml (the same list as
# "broker.chartProviderKeys" in helm/broker/templates/_helpers.tpl).
CHART_PROVIDER_KEYS: dict[str, dict[str, Any]] = {
    "clientSecret": {
        "type": "string",
        "description": "Stored in the chart's Secret, mounted as a file.",
    },
    "public": {"type": "boolean", "description": "A public client: no client secret."},
}
# Provider settings the chart refuses: an inline secret would be written into the ConfigMap
# (its clientSecret goes into the Secret instead).
CHART_REFUSED_PROVIDER_SETTINGS = ("client_secret",)
# The chart's own key in a webhook's value (the same list as "broker.chartWebhookKeys" in
# _helpers.tpl): its signing secret, stored in the chart's Secret and mounted as a file, which
# the chart names in secret_file itself; so it refuses the secret settings of broker.toml.
CHART_WEBHOOK_KEYS: dict[str, dict[str, Any]] = {
    "signingSecret": {
        "type": "string",
        "pattern": "^whsec_[A-Za-z0-9+/=]+$",
        "description": "whsec_<base64>: stored in the chart's Secret (webhook-<name>-secret), "
        "mounted as a file. With existingSecret, that Secret's key instead.",
    },
}
CHART_REFUSED_WEBHOOK_SETTINGS = ("secret", "secret_env", "secret_file")
_BLOCK = re.compile(r"(<!-- settings:begin (\w+) -->\n)(.*?)(<!-- settings:end -->)", re.DOTALL)


class _SettingsSchema(GenerateJsonSchema):
    """Pydantic's schema without a title per field (the name says it), and with JSON Schema's
    names for the bounds of an optional number (pydantic writes ``ge``/``le`` there)."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        result: JsonSchemaValue = _standard_bounds(super().generate(schema, mode))
        return result


_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def _standard_bounds(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_standard_bounds(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    numeric = schema.get("type") in ("integer", "number")
    return {
        (_BOUNDS[key] if numeric and key in _BOUNDS else key): _standard_bounds(value)
        for key, value in schema.items()
    }


def config_schema() -> JsonSchemaValue:
    """The JSON Schema of broker.toml: the top level, ``providers`` and ``clients``."""
    return Settings.model_json_schema(schema_generator=_SettingsSchema)


def settings_table(model: type[BaseModel]) -> str:
    """The Markdown table of ``model``'s settings (tables of tables have sections of their own)."""
    properties = model.model_json_schema(schema_generator=_SettingsSchema)["properties"]
    rows = [
        f"<!-- generated from the settings models by `{REGENERATE}`: edit them, not this -->",
        "| setting | default | allowed | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in settings_of(model).items():
        if is_table(field) and model is Settings:  # providers, clients: sections of their own
            continue
        cells = (f"`{name}`", _default(field), _allowed(properties[name]), field.description or "")
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def render_docs(text: str) -> str:
    """``text`` (docs/configuration.md) with every settings table regenerated."""

    def table(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise ValueError(f"unknown settings table {name!r} (one of {', '.join(TABLES)})")
        return match.group(1) + settings_table(TABLES[name]) + match.group(4)

    return _BLOCK.sub(table, text)


def chart_config_schema() -> dict[str, Any]:
    """The ``config`` object of the chart's values.schema.json."""
    schema = config_schema()
    fields = settings_of(Settings)
    tables = [name for name, field in fields.items() if is_table(field)]
    properties = {
        name: _chart_setting(schema["properties"][name])
        for name in fields
        if name not in CHART_OWNED and name not in tables
    }
    return {
        "type": "object",
        "description": "broker.toml top-level settings (docs/configuration.md), generated from "
        f"broker/settings_model.py and broker/settings_groups.py by `{REGENERATE}`.",
        "properties": properties,
        "propertyNames": {"not": {"enum": [*CHART_OWNED, *tables]}},
        "additionalProperties": False,
    }


def chart_providers_schema() -> dict[str, Any]:
    """The ``providers`` object of the chart's values.schema.json: name → provider."""
    schema = config_schema()
    [name_pattern] = schema["properties"]["providers"]["patternProperties"]
    provider = schema["$defs"][ProviderSettings.__name__]
    # In a values file a setting is given or left out: the null that the JSON Schema allows
    # for an optional setting is refused, as the templates would take it for a given setting
    # (hasKey client_secret_env: no secret file) and then write nothing to broker.toml.
    properties = {
        name: _chart_setting(_without_null(setting))
        for name, setting in provider["properties"].items()
        if name not in CHART_REFUSED_PROVIDER_SETTINGS
    }
    rules = {key: provider[key] for key in ("required", "anyOf") if key in provider}
    return {
        "type": "object",
        "description": "broker.toml [providers.<name>] tables (docs/configuration.md): broker's "
        "provider settings but an inline client_secret, generated from "
        f"broker/settings_providers.py by `{REGENERATE}`, and the chart's own keys.",
        "propertyNames": {"pattern": name_pattern},
        "additionalProperties": {
            "type": "object",
            "properties": {**properties, **CHART_PROVIDER_KEYS},
            **rules,
            "propertyNames": {"not": {"enum": list(CHART_REFUSED_PROVIDER_SETTINGS)}},
            "additionalProperties": False,
        },
    }


def chart_clients_schema() -> dict[str, Any]:
    """The ``clients`` array of the chart's values.schema.json (its template passes each
    client's keys by name: helm/broker/templates/_helpers.tpl "broker.clientsToml")."""
    schema = config_schema()
    client = _inline(schema["$defs"][ClientSettings.__name__], schema["$defs"])
    properties = {
        name: _chart_setting(_without_null(setting))
        for name, setting in client["properties"].items()
    }
    return {
        "type": "array",
        "description": "broker.toml [[clients]] tables (docs/configuration.md), generated from "
        f"broker/settings_providers.py by `{REGENERATE}`.",
        "items": {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
            "required": client["required"],
        },
    }


def chart_webhooks_schema() -> dict[str, Any]:
    """The ``webhooks`` list of the chart's values.schema.json: broker's webhook settings but
    the secret ones, a required ``name`` (it names the secret's key), and ``signingSecret``."""
    webhook = config_schema()["$defs"][WebhookSettings.__name__]
    properties = {
        name: _chart_setting(_without_null(setting))
        for name, setting in webhook["properties"].items()
        if name not in CHART_REFUSED_WEBHOOK_SETTINGS
    }
    return {
        "type": "array",
        "description": "broker.toml [[webhooks]] tables (docs/webhooks.md): broker's webhook "
        "settings but the secret ones, generated from broker/settings_webhooks.py by "
        f"`{REGENERATE}`, and the chart's own signingSecret.",
        "items": {
            "type": "object",
            "properties": {**properties, **CHART_WEBHOOK_KEYS},
            "required": ["url", "name"],
            "additionalProperties": False,
        },
    }


def _inline(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with each ``$ref`` to ``#/$defs/...`` replaced by its definition."""
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        own = {k: v for k, v in target.items() if k not in ("title", "description")}
        return _inline({**own, **siblings}, definitions)
    return {key: _inline(value, definitions) for key, value in schema.items()}


def render_chart_schema(text: str) -> str:
    """``text`` (values.schema.json) with its ``config``, ``clients``, ``providers`` and
    ``webhooks`` regenerated."""
    document = json.loads(text)
    document["properties"]["config"] = chart_config_schema()
    document["properties"]["clients"] = chart_clients_schema()
    document["properties"]["providers"] = chart_providers_schema()
    document["properties"]["webhooks"] = chart_webhooks_schema()
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[Path, str]:
    """Each generated file and what it should contain now."""
    return {
        DOCS: render_docs(DOCS.read_text(encoding="utf-8")),
        CHART_SCHEMA: render_chart_schema(CHART_SCHEMA.read_text(encoding="utf-8")),
    }


def _chart_setting(schema: dict[str, Any]) -> dict[str, Any]:
    """A setting's schema in the chart's: defaults are the chart's (values.yaml) or broker's,
    not stated; formats are not asserted alike by every validator."""
    return {k: v for k, v in _without_formats(schema).items() if k != "default"}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without the null option of an optional setting."""
    options = [option for option in schema.get("anyOf", []) if option != {"type": "null"}]
    if "anyOf" not in schema or len(options) != 1:
        return schema
    return {**{k: v for k, v in schema.items() if k != "anyOf"}, **options[0]}


def _without_formats(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_without_formats(item) for item in schema]
    if isinstance(schema, dict):
        return {k: _without_formats(v) for k, v in schema.items() if k != "format"}
    return schema


def _default(field: FieldInfo) -> str:
    shown = [item.text for item in field.metadata if isinstance(item, ShownDefault)]
    if shown:
        return shown[0]
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list | frozenset):
        return f"`{json.dumps(list(value))}`"
    return f"`{_number(value) if isinstance(value, int | float) else value}`"


def _allowed(schema: dict[str, Any], plural: bool = False) -> str:
    """What a setting accepts, in words, from its JSON Schema."""
    options = [option for option in schema.get("anyOf", [schema]) if option.get("type") != "null"]
    if len(options) > 1:
        return " or ".join(_allowed(option, plural) for option in options)
    schema = options[0]
    kind = schema.get("type")
    ending = "s" if plural else ""
    if "enum" in schema:
        return ", ".join(f"`{value}`" for value in schema["enum"])
    if kind == "boolean":
        return "`true`, `false`"
    if kind in ("integer", "number"):
        return _range(("whole number" if kind == "integer" else "number") + ending, schema)
    if kind == "array":
        items = schema.get("items", {})
        if "enum" in items:
            return ("one or more of " if schema.get("minItems") else "any of ") + _allowed(items)
        return ("non-empty list of " if schema.get("minItems") else "list of ") + _allowed(
            items, plural=True
        )
    if "$ref" in schema:
        return "a table, see below"
    if kind == "string":
        noun = {"uri": "URL", "password": "secret string"}.get(schema.get("format", ""), "string")
        if "pattern" in schema:
            return f"{noun}{ending} matching `{schema['pattern']}`"
        return ("non-empty " if schema.get("minLength") else "") + noun + ending
    return "see below"


def _range(kind: str, schema: dict[str, Any]) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"{kind} {_number(low)}..{_number(high)}"
    bounds = [
        f"{sign} {_number(schema[key])}"
        for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"))
        if key in schema
    ] + [
        f"{sign} {_number(schema[key])}"
        for key, sign in (("maximum", "≤"), ("exclusiveMaximum", "<"))
        if key in schema
    ]
    return f"{kind} {', '.join(bounds)}" if bounds else kind


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.settings_docs",
        description="Regenerate the settings tables of docs/configuration.md and the config "
        "and providers parts of helm/broker/values.schema.json from the settings models.",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = [path for path, text in generated().items() if path.read_text("utf-8") != text]
    for path in stale:
        if args.check:
            print(f"{path.relative_to(ROOT)} is stale: run `{REGENERATE}`", file=sys.stderr)
        else:
            path.write_text(generated()[path], encoding="utf-8")
            print(f"rewrote {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
