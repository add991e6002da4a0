"""The documentation covers what it documents: the chart's README, docs/RUNBOOK.md. Run with
the tools' venv (PyYAML)."""

import json
import pathlib
import re
from typing import Any

import yaml


def values_documented(values: str, readme: str) -> bool:
    """Every key of values.yaml (or one of its parents) has a row in the README's values
    table, and every row names a key that exists."""
    tree = yaml.safe_load(pathlib.Path(values).read_text())
    nodes: set[str] = set()
    leaves: set[str] = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            nodes.add(path)
            if isinstance(value, dict) and value:
                walk(value, path)
            else:
                leaves.add(path)

    walk(tree, "")
    section = pathlib.Path(readme).read_text().partition("\n## Values\n")[2].partition("\n## ")[0]
    rows = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", section, re.M))
    ok = True
    for leaf in sorted(leaves):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in rows for i in range(1, len(parts) + 1)):
            print(f"{leaf}: not documented in {readme}")
            ok = False
    for row in sorted(rows - nodes):
        print(f"{row}: documented in {readme}, but not in {values}")
        ok = False
    print(f"{len(leaves)} values, {len(rows)} documented rows")
    return ok


def runbook_covers(metrics_json: str, runbook: str) -> bool:
    """docs/RUNBOOK.md names every metric broker exports and every health endpoint."""
    text = pathlib.Path(runbook).read_text()
    families: list[str] = json.loads(pathlib.Path(metrics_json).read_text())["_families"]
    missing = [f for f in families if f not in text]
    missing += [e for e in ("/healthz", "/readyz", "/metrics") if e not in text]
    for m in missing:
        print(f"{m}: not in {runbook}")
    print(f"{len(families)} metrics")
    return not missing
