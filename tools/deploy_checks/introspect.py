"""Checks that import broker: run with the image's runtime venv, so they see the broker wheel
and the locked dependencies the image has. Standard library, broker and its dependencies only."""

import json
import pathlib

from prometheus_client.metrics import MetricWrapperBase

from broker.config import ProviderSettings, Settings
from broker.metrics import Metrics
from broker.settings_webhooks import WebhookSettings


def schema_matches_broker(schema_path: str) -> bool:
    """(Run with the image's Python.) values.schema.json knows exactly broker's settings:
    config = the top-level settings minus the chart's own, providers.<name> = the provider
    settings minus an inline client_secret, plus the chart's clientSecret and public;
    webhooks[] = the webhook settings minus the secret ones, plus the chart's signingSecret."""
    schema = json.loads(pathlib.Path(schema_path).read_text())["properties"]
    chart_owned = {"host", "port", "redis_url", "encryption_keys_file", "encryption_keys_env"}
    top = set(Settings.model_fields) - {"encryption_keys", "ephemeral_encryption_key"}
    tables = {"providers", "clients", "webhooks"}
    top = (top | {"encryption_keys_file", "encryption_keys_env"}) - tables
    prov = set(ProviderSettings.model_fields) - {"name", "client_secret"}
    prov |= {"client_secret_env", "client_secret_file"}
    in_schema = set(schema["config"]["properties"])
    prov_schema = set(schema["providers"]["additionalProperties"]["properties"])
    prov_schema -= {"clientSecret", "public"}
    problems = [
        f"config.{k}: a broker setting missing from {schema_path}"
        for k in sorted(top - chart_owned - in_schema)
    ]
    problems += [
        f"config.{k}: in {schema_path}, not a broker setting" for k in sorted(in_schema - top)
    ]
    problems += [
        f"providers.<name>.{k}: a broker setting missing from {schema_path}"
        for k in sorted(prov - prov_schema)
    ]
    problems += [
        f"providers.<name>.{k}: in {schema_path}, not a broker setting"
        for k in sorted(prov_schema - prov)
    ]
    hook = set(WebhookSettings.model_fields) - {"secret", "secret_env", "secret_file"}
    hook_schema = set(schema["webhooks"]["items"]["properties"]) - {"signingSecret"}
    problems += [
        f"webhooks[].{k}: a broker setting missing from {schema_path}"
        for k in sorted(hook - hook_schema)
    ]
    problems += [
        f"webhooks[].{k}: in {schema_path}, not a broker setting"
        for k in sorted(hook_schema - hook)
    ]
    for problem in problems:
        print(problem)
    print(f"{len(top)} top-level, {len(prov)} provider and {len(hook)} webhook settings")
    return not problems


def exported_metrics(out: str) -> bool:
    """(Run with the image's Python.) Metric names broker exports, with their label names."""
    result: dict[str, list[str]] = {}
    families: list[str] = []
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # prometheus_client keeps a metric's name, type and label names private.
        name, kind, labels = metric._name, metric._type, list(metric._labelnames)
        families.append(name + ("_total" if kind == "counter" else ""))
        suffixes: dict[str | None, list[str]] = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }
        for suffix in suffixes.get(kind, [""]):
            result[name + suffix] = labels + (["le"] if suffix == "_bucket" else [])
    result["broker_build_info"] = ["version"]
    families.append("broker_build_info")
    result["_families"] = families
    pathlib.Path(out).write_text(json.dumps(result, indent=1))
    print(f"{len(families)} metric families")
    return True
