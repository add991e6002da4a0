"""API keys and ``[[clients]]`` tables for tests that need more than the default client."""

from __future__ import annotations

from typing import Any

from broker.auth import hash_key, new_api_key
from tests.conftest import ALL_PERMISSIONS, SECRETS


def api_key() -> str:
    """A new API key, registered as a secret no log may show."""
    key = new_api_key()
    SECRETS.add(key)
    return key


def client(name: str, *keys: str, **settings: Any) -> dict[str, Any]:
    """A [[clients]] table for ``keys``; all permissions and providers unless overridden."""
    hashes: str | list[str] = hash_key(keys[0]) if len(keys) == 1 else [hash_key(k) for k in keys]
    return {
        "name": name,
        "key_sha256": hashes,
        "providers": ["*"],
        "permissions": ALL_PERMISSIONS,
        **settings,
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
