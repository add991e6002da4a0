"""Client API keys and permissions.

Only each key's SHA-256 is configured. A presented key is hashed and compared with every
configured hash in constant time, so response timing says nothing about which hashes exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from broker.config import ClientSettings
from broker.errors import Forbidden, Unauthenticated

API_KEY_PREFIX = "brk_"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    """A new random API key (256 bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, clients: Sequence[ClientSettings]) -> None:
        self._clients = tuple(clients)

    def authenticate(self, authorization: str | None) -> ClientSettings:
        """The client a ``Bearer`` header belongs to, or Unauthenticated."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("send 'Authorization: Bearer <api key>'")
        digest = hash_key(key)
        found: ClientSettings | None = None
        for client in self._clients:
            if hmac.compare_digest(digest, client.key_sha256):
                found = client
        if found is None:
            raise Unauthenticated("unknown API key")
        return found


def authorize(client: ClientSettings, permission: str, provider: str | None = None) -> None:
    """Raise Forbidden unless ``client`` holds ``permission`` (for ``provider``)."""
    if permission not in client.permissions:
        raise Forbidden(f"client {client.name!r} lacks the {permission!r} permission")
    if provider is not None and not client.may_use(provider):
        raise Forbidden(f"client {client.name!r} may not use provider {provider!r}")
