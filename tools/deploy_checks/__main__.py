"""`python -m tools.deploy_checks <check> args...`: run one check; exit 0 if it passed, else 1.

A check's name is its function's with dashes (`lock-matches-pyproject` runs
`lock_matches_pyproject`). Only the module that defines the check is imported, so a check run with
the image's venv never imports PyYAML, jsonschema or promql-parser.
"""

import importlib
import sys
from collections.abc import Callable

# A check's function -> the module of this package that defines it.
MODULES = {
    "dockerignore_allows_copies": "image",
    "lock_matches_pyproject": "image",
    "healthcheck_is_python": "image",
    "compose_demo": "compose",
    "rendered_config": "pod",
    "monitoring": "monitoring",
    "values_documented": "documentation",
    "runbook_covers": "documentation",
    "exported_metrics": "introspect",
    "schema_matches_broker": "introspect",
    "audit_verdict": "audit",
}


def main(argv: list[str]) -> int:
    """Run the check `argv[0]` with the arguments `argv[1:]`; its exit status."""
    check, *args = argv
    function = check.replace("-", "_")
    module = importlib.import_module(f".{MODULES[function]}", __package__)
    run: Callable[..., bool] = getattr(module, function)
    return 0 if run(*args) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
