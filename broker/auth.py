"""Client API keys, permissions and the user ids a client may name.

Only each key's SHA-256 is configured (one or several per client, for rotation). A presented
key is hashed and compared with every configured hash in constant time, so response timing says
nothing about which hashes exist.

The clients are an immutable snapshot that :meth:`Authenticator.replace` swaps in one
assignment (a configuration reload): a request keeps the ``ClientSettings`` it authenticated
with until it ends, and the next request sees the new snapshot.

``user_ids`` patterns are :func:`fnmatch.fnmatchcase` globs over the whole decoded user id:
``*`` any characters (``/`` and ``.`` included), ``?`` one character, ``[seq]`` / ``[!seq]`` one
character in / not in ``seq``; case-sensitive; a literal ``*``, ``?`` or ``[`` is written
``[*]``, ``[?]``, ``[[]``. No path semantics: ``..`` and ``/`` are ordinary characters.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from functools import lru_cache

from broker.config import ClientSettings
from broker.errors import Forbidden, Unauthenticated

API_KEY_PREFIX = "brk_"
PATTERN_CACHE = 4096


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    """A new random API key (256 bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, clients: Sequence[ClientSettings]) -> None:
        self._clients = tuple(clients)

    @property
    def clients(self) -> tuple[ClientSettings, ...]:
        return self._clients

    def replace(self, clients: Sequence[ClientSettings]) -> None:
        """Serve ``clients`` from the next request on (requests in flight keep theirs)."""
        self._clients = tuple(clients)

    def authenticate(self, authorization: str | None) -> ClientSettings:
        """The client a ``Bearer`` header belongs to, or Unauthenticated."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("send 'Authorization: Bearer <api key>'")
        digest = hash_key(key)
        found: ClientSettings | None = None
        for client in self._clients:  # one snapshot, read once
            for configured in client.key_sha256:  # every hash, no early exit
                if hmac.compare_digest(digest, configured):
                    found = client
        if found is None:
            raise Unauthenticated("unknown API key")
        return found


def authorize(
    client: ClientSettings,
    permission: str,
    provider: str | None = None,
    user_id: str | None = None,
) -> None:
    """Raise Forbidden unless ``client`` holds ``permission`` (for ``provider``, and for
    ``user_id`` when the client is restricted to some user ids)."""
    if permission not in client.permissions:
        raise Forbidden(f"client {client.name!r} lacks the {permission!r} permission")
    if provider is not None and not client.may_use(provider):
        raise Forbidden(f"client {client.name!r} may not use provider {provider!r}")
    if user_id is not None and not may_name(client, user_id):
        raise Forbidden(f"client {client.name!r} may not use this user id")


def may_name(client: ClientSettings, user_id: str) -> bool:
    """Whether ``client`` may name ``user_id`` (always, without ``user_ids``)."""
    if client.user_ids is None:
        return True
    return any(_glob(pattern).match(user_id) for pattern in client.user_ids)


@lru_cache(maxsize=PATTERN_CACHE)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))
