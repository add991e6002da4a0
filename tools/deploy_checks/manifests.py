"""Reading `helm template` output. Needs PyYAML (the tools' venv)."""

import pathlib
from typing import Any

import yaml

# One Kubernetes object as YAML gives it.
Manifest = dict[str, Any]


def docs(path: str) -> list[Manifest]:
    """The non-empty YAML documents of a file, in order."""
    return [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
