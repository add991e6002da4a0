"""What is generated from the settings models matches them: the documentation's tables, the
Helm chart's schema, `broker config-schema`; and the JSON Schema agrees with the validation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from broker import __version__
from broker.config import ClientSettings, ProviderSettings, Settings
from broker.settings_docs import (
    CHART_OWNED,
    CHART_PROVIDER_KEYS,
    CHART_REFUSED_PROVIDER_SETTINGS,
    CHART_SCHEMA,
    DOCS,
    REGENERATE,
    ROOT,
    TABLES,
    chart_config_schema,
    chart_providers_schema,
    config_schema,
    generated,
)
from broker.settings_types import settings_of
from broker.settings_webhooks import WebhookSettings

STALE = "{path} is stale: the settings models changed. Run `{command}` and commit the result."


@pytest.mark.parametrize("path", [DOCS, CHART_SCHEMA], ids=lambda p: p.name)
def test_the_generated_files_match_the_settings_models(path: Path) -> None:
    expected = generated()[path]
    assert path.read_text(encoding="utf-8") == expected, STALE.format(
        path=path.relative_to(ROOT), command=REGENERATE
    )


def test_the_documentation_has_a_generated_table_for_each_model() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in TABLES:
        assert text.count(f"<!-- settings:begin {name} -->") == 1
    assert text.count("<!-- settings:end -->") == len(TABLES)
    for model in TABLES.values():
        for setting in settings_of(model):
            if setting not in ("providers", "clients", "webhooks"):
                assert f"| `{setting}` |" in text, f"{model.__name__}.{setting} is not documented"


@pytest.mark.parametrize("model", [Settings, ProviderSettings, ClientSettings, WebhookSettings])
def test_every_setting_has_a_description(model: type[Settings]) -> None:
    missing = [name for name, field in settings_of(model).items() if not field.description]
    assert not missing, f"{model.__name__}: give these fields a description: {missing}"


def test_the_chart_passes_every_setting_through_but_its_own() -> None:
    config = json.loads(CHART_SCHEMA.read_text(encoding="utf-8"))["properties"]["config"]
    tables = {"providers", "clients", "webhooks"}
    expected = set(settings_of(Settings)) - set(CHART_OWNED) - tables
    assert set(config["properties"]) == expected
    assert set(config["propertyNames"]["not"]["enum"]) == {*CHART_OWNED, *tables}
    assert config == chart_config_schema()


def test_the_chart_passes_every_provider_setting_through_but_an_inline_secret() -> None:
    providers = json.loads(CHART_SCHEMA.read_text(encoding="utf-8"))["properties"]["providers"]
    provider = providers["additionalProperties"]
    expected = set(settings_of(ProviderSettings)) - set(CHART_REFUSED_PROVIDER_SETTINGS)
    assert set(provider["properties"]) == expected | set(CHART_PROVIDER_KEYS)
    assert provider["propertyNames"]["not"]["enum"] == ["client_secret"]
    assert provider["required"] == ["client_id"]
    assert providers == chart_providers_schema()
    assert "$ref" not in json.dumps(providers)  # the chart's schema stands alone


def test_the_chart_provider_keys_are_the_ones_its_templates_keep_out_of_broker_toml() -> None:
    helpers = (ROOT / "helm/broker/templates/_helpers.tpl").read_text(encoding="utf-8")
    keys = re.search(r'define "broker\.chartProviderKeys" -}}(.*?){{-', helpers)
    assert keys is not None
    assert set(keys.group(1).split()) == set(CHART_PROVIDER_KEYS)


def chart_values() -> list[tuple[str, dict[str, Any]]]:
    files = [ROOT / "helm/broker/values.yaml", *sorted((ROOT / "helm/broker/ci").glob("*.yaml"))]
    return [(path.name, yaml.safe_load(path.read_text(encoding="utf-8"))) for path in files]


@pytest.mark.parametrize(("name", "values"), chart_values(), ids=[n for n, _ in chart_values()])
def test_the_charts_own_values_fit_its_config_schema(name: str, values: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(chart_config_schema()).validate(values.get("config") or {})


@pytest.mark.parametrize(("name", "values"), chart_values(), ids=[n for n, _ in chart_values()])
def test_the_charts_own_values_fit_its_providers_schema(name: str, values: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(chart_providers_schema()).validate(values.get("providers") or {})


def test_the_chart_schema_refuses_what_broker_refuses() -> None:
    validator = jsonschema.Draft7Validator(chart_config_schema())
    for bad in ({"port": 8080}, {"authorization_ttl": 30}, {"log_format": "xml"}, {"nope": 1}):
        assert not validator.is_valid(bad), bad


GOOD_PROVIDER = {"token_url": "https://idp.example/token", "client_id": "broker"}


@pytest.mark.parametrize(
    "provider",
    [
        {"client_id": "broker"},  # no token endpoint, nor one to discover
        {**GOOD_PROVIDER, "token_url": ""},
        {**GOOD_PROVIDER, "token_url": "ftp://idp.example/token"},
        {**GOOD_PROVIDER, "client_id": ""},
        {**GOOD_PROVIDER, "client_auth": "private_key_jwt"},
        {**GOOD_PROVIDER, "pkce": "no"},
        {**GOOD_PROVIDER, "max_concurrency": 5000},
        {**GOOD_PROVIDER, "scopes": [""]},
        {**GOOD_PROVIDER, "name": "other"},
        {**GOOD_PROVIDER, "nope": 1},
    ],
)
def test_the_chart_provider_schema_refuses_what_broker_refuses(provider: dict[str, Any]) -> None:
    assert not jsonschema.Draft7Validator(chart_providers_schema()).is_valid({"p": provider})
    with pytest.raises(ValidationError):
        Settings.model_validate({"providers": {"p": provider}})


@pytest.mark.parametrize(
    "provider",
    [
        {**GOOD_PROVIDER, "client_secret": "inline"},  # would be written into the ConfigMap
        {**GOOD_PROVIDER, "client_secret_env": None},  # a null key would pass for a given one
    ],
)
def test_the_chart_provider_schema_refuses_what_the_chart_refuses(
    provider: dict[str, Any],
) -> None:
    assert not jsonschema.Draft7Validator(chart_providers_schema()).is_valid({"p": provider})


def test_the_chart_provider_schema_accepts_the_charts_own_keys_and_discovery() -> None:
    validator = jsonschema.Draft7Validator(chart_providers_schema())
    for good in (
        {**GOOD_PROVIDER, "clientSecret": "s"},
        {"issuer": "https://idp.example", "client_id": "broker", "public": True},
        {"discovery_url": "https://idp.example/.well-known/x", "client_id": "broker"},
    ):
        validator.validate({"p": good})
    assert not validator.is_valid({"Not A Name": GOOD_PROVIDER})


def example_configs() -> list[Path]:
    return [
        *sorted((ROOT / "examples").rglob("*.toml")),
        ROOT / "deploy/compose/broker.toml",
    ]


@pytest.mark.parametrize("path", example_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_example_configurations_fit_the_json_schema(path: Path) -> None:
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(config_schema()).validate(document)


def example_providers() -> dict[str, dict[str, Any]]:
    """The provider tables of the example configurations, as chart values (an inline secret
    becomes the chart's clientSecret)."""
    found = {}
    for path in example_configs():
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        for name, table in document.get("providers", {}).items():
            secret = table.pop("client_secret", None)
            values = table if secret is None else {**table, "clientSecret": secret}
            found[f"{path.relative_to(ROOT)}:{name}"] = values
    return found


@pytest.mark.parametrize("name", example_providers())
def test_the_example_providers_fit_the_charts_providers_schema(name: str) -> None:
    jsonschema.Draft7Validator(chart_providers_schema()).validate({"p": example_providers()[name]})


@pytest.mark.parametrize(
    "document",
    [
        {"port": 8080.5},
        {"lock_ttl": 0.1},
        {"key_prefix": "has space"},
        {"providers": {"alfresco": {"token_url": "https://idp.example/token"}}},
        {"providers": {"alfresco": {"client_id": "b", "pkce": "no"}}},
        {"providers": {"alfresco": {"client_id": "b"}}},
        {"providers": {"alfresco": {"client_id": "b", "token_url": ""}}},
        {"clients": [{"name": "c", "key_sha256": "abc", "providers": ["*"], "permissions": []}]},
        {"bogus": 1},
    ],
)
def test_the_json_schema_refuses_what_validation_refuses(document: dict[str, Any]) -> None:
    assert not jsonschema.Draft202012Validator(config_schema()).is_valid(document)


def test_config_schema_prints_the_schema_of_broker_toml() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "config-schema"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    schema = json.loads(result.stdout)
    assert schema == config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"redis_url", "lock_ttl", "providers", "clients"} <= set(schema["properties"])
    assert {"ProviderSettings", "ClientSettings"} <= set(schema["$defs"])
    assert "encryption_keys" not in schema["properties"]  # derived at load time, not a setting


def test_the_chart_the_image_and_the_openapi_document_name_this_version() -> None:
    """broker.__version__ is the one place a release is named (pyproject.toml reads it)."""
    chart = yaml.safe_load((ROOT / "helm/broker/Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == __version__
    dockerfile = (ROOT / "deploy/Dockerfile").read_text(encoding="utf-8")
    assert f"ARG VERSION={__version__}\n" in dockerfile
    openapi = json.loads((ROOT / "broker/openapi.json").read_text(encoding="utf-8"))
    assert openapi["info"]["version"] == __version__
