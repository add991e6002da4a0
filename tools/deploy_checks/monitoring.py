"""prometheus-operator objects of a rendered chart: ServiceMonitor and PrometheusRule. Run with
the tools' venv (PyYAML, jsonschema, promql-parser)."""

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import promql_parser

from .manifests import docs

SERVICEMONITOR: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"const": "/metrics"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}
DURATION: dict[str, Any] = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
PROMETHEUSRULE: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {
                                            "type": "string",
                                            "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                        },
                                        "record": {
                                            "type": "string",
                                            "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$",
                                        },
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# Labels a scrape adds to every series (prometheus-operator's ServiceMonitor targets).
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "endpoint", "container"}


def monitoring(render: str, metrics_json: str, runbook: str) -> bool:
    """ServiceMonitor and PrometheusRule: structure (schemas above), every expression parses
    as PromQL and uses only metrics and labels broker exports, every alert has a runbook
    annotation whose section exists in docs/RUNBOOK.md."""
    metrics: dict[str, list[str]] | None = (
        json.loads(pathlib.Path(metrics_json).read_text()) if metrics_json != "-" else None
    )
    anchors = {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+\s+(.+)$", pathlib.Path(runbook).read_text(), re.M)
    }
    seen = {"ServiceMonitor": 0, "PrometheusRule": 0}
    ok = True
    for doc in docs(render):
        kind = doc.get("kind")
        if kind not in seen:
            continue
        seen[kind] += 1
        schema = SERVICEMONITOR if kind == "ServiceMonitor" else PROMETHEUSRULE
        for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
            print(f"{kind}: {'.'.join(map(str, err.path))}: {err.message}")
            ok = False
        if kind != "PrometheusRule":
            continue
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                try:
                    tree = promql_parser.parse(rule["expr"])
                except ValueError as err:
                    print(f"{name}: expr is not PromQL: {err}")
                    ok = False
                    continue
                if metrics is not None and group["name"] != "broker.extra":
                    ok &= check_promql(name, tree, metrics)
                if "alert" in rule:
                    notes = rule.get("annotations", {})
                    link = notes.get("runbook_url") or notes.get("runbook") or ""
                    anchor = link.rpartition("#")[2]
                    if not anchor or anchor not in anchors:
                        print(f"{name}: runbook anchor #{anchor} is not a heading of {runbook}")
                        ok = False
                    if "severity" not in rule.get("labels", {}):
                        print(f"{name}: no severity label")
                        ok = False
    print(f"checked {seen}")
    return ok


def check_promql(name: str, tree: Any, metrics: dict[str, list[str]]) -> bool:
    """Metric and label names of the broker's series in one expression."""
    ok = True

    def selectors(node: Any) -> Iterator[Any]:
        kind = type(node).__name__
        if kind == "VectorSelector":
            yield node
        for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                yield from selectors(child)
        for child in getattr(node, "args", None) or []:
            yield from selectors(child)

    def visit(node: Any) -> None:
        nonlocal ok
        kind = type(node).__name__
        if kind == "AggregateExpr" and node.modifier is not None:
            labels = set(node.modifier.labels)
            inner = [m for m in (s.name for s in selectors(node.expr)) if m in metrics]
            for metric in inner:
                missing = labels - set(metrics[metric]) - TARGET_LABELS
                if missing:
                    print(f"{name}: aggregates {metric} by unknown labels {sorted(missing)}")
                    ok = False
        for attr in ("lhs", "rhs", "expr", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    for sel in selectors(tree):
        metric = sel.name
        if metric == "up":
            continue
        if metric not in metrics:
            print(f"{name}: {metric} is not a metric broker exports")
            ok = False
            continue
        for matcher in sel.matchers.matchers:
            if matcher.name not in set(metrics[metric]) | TARGET_LABELS:
                print(f"{name}: {metric} has no label {matcher.name}")
                ok = False
    visit(tree)
    return ok
