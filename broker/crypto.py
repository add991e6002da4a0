"""Encryption at rest: a key ring of AES-256-GCM keys with ids.

Each record is ``0x01 | len(kid) | kid | 96-bit random nonce | ciphertext+tag``. The first key
encrypts; every key decrypts, so keys rotate by prepending a new one and re-encrypting later.
The grant identity is bound as associated data: a ciphertext copied into another user's record
fails authentication instead of handing out that user's token.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import GrantUnreadable

FORMAT_VERSION = 1
NONCE_BYTES = 12


def grant_aad(provider: str, user_id: str) -> bytes:
    """Associated data naming one grant; provider names and user ids contain no NUL."""
    return b"broker/grant/v1\x00" + provider.encode() + b"\x00" + user_id.encode()


def app_token_aad(provider: str, scope_id: str) -> bytes:
    """Associated data naming one app token record: its provider and scope id (a hash of the
    normalised scope, ``broker/app_store.py``)."""
    return b"broker/app-token/v1\x00" + provider.encode() + b"\x00" + scope_id.encode()


def authorization_aad(key: str) -> bytes:
    """Associated data naming one pending authorization by its Redis key."""
    return b"broker/authz/v1\x00" + key.encode()


def new_key() -> str:
    """A fresh ``<id>:<base64>`` key for BROKER_ENCRYPTION_KEYS."""
    kid = "k" + secrets.token_hex(4)
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"


def record_key_id(blob: bytes) -> str | None:
    """The key id a record's header names (printable, at most 64 characters: a record may be
    forged), or None when its format version is not known."""
    if len(blob) < 2 or blob[0] != FORMAT_VERSION:
        return None
    kid = blob[2 : 2 + blob[1]].decode("ascii", errors="replace")
    return "".join(c if c.isprintable() else "?" for c in kid)[:64]


class KeyRing:
    """Encrypts with the first key; decrypts with whichever key a record names."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self._keys = {kid: AESGCM(key) for kid, key in keys}
        self.primary_id = keys[0][0]
        self._primary = self._keys[self.primary_id]
        self._primary_header = (
            bytes([FORMAT_VERSION, len(self.primary_id)]) + self.primary_id.encode()
        )

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return self._primary_header + nonce + self._primary.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Plaintext, or GrantUnreadable for a foreign format, unknown key or failed tag."""
        kid, body = self._split(blob)
        aead = self._keys.get(kid)
        if aead is None:
            raise GrantUnreadable(f"record is encrypted with key {kid!r}, which is not configured")
        try:
            return aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], aad)
        except InvalidTag as err:
            raise GrantUnreadable("record failed authentication") from err

    def key_id_of(self, blob: bytes) -> str:
        return self._split(blob)[0]

    def known_key_id(self, blob: bytes) -> str | None:
        """The id of the ring's key a record names; None for another key or format (never
        raises: ids read from a record stay out of metric labels unless configured)."""
        kid = record_key_id(blob)
        return kid if kid in self._keys else None

    @staticmethod
    def _split(blob: bytes) -> tuple[str, bytes]:
        if len(blob) < 2:
            raise GrantUnreadable("record is truncated")
        if blob[0] != FORMAT_VERSION:
            raise GrantUnreadable(f"record has format version {blob[0]}, which is not known")
        end = 2 + blob[1]
        body = blob[end:]
        if len(body) < NONCE_BYTES + 16:
            raise GrantUnreadable("record is truncated")
        return blob[2:end].decode("ascii", errors="replace"), body
