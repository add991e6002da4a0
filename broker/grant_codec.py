"""A grant record's ``blob``: the grant in its record format (``broker/grant_record.py``),
encrypted under the key ring with the grant's identity as associated data (``broker/crypto.py``),
so a blob copied under another grant's key fails authentication. ``broker/store.py`` moves
blobs without looking inside.
"""

from __future__ import annotations

from typing import Any

import structlog

from broker import grant_record
from broker.crypto import KeyRing, grant_aad, record_key_id
from broker.errors import GrantUnreadable
from broker.metrics import Metrics
from broker.models import Grant

security = structlog.get_logger("broker.security")


class GrantCodec:
    """Grants to and from their stored ``v`` and ``blob`` fields."""

    def __init__(self, keyring: KeyRing, metrics: Metrics, record_format: int = 2) -> None:
        self.keyring = keyring
        self._metrics = metrics
        self._record_format = record_format

    def encrypt(self, grant: Grant) -> bytes:
        """The ``blob`` a write stores for ``grant``."""
        payload = grant_record.encode(grant, self._record_format)
        return self.keyring.encrypt(payload, grant_aad(grant.provider, grant.user_id))

    def decode_record(self, provider: str, user_id: str, version: Any, blob: Any) -> Grant | None:
        """A record's ``v`` and ``blob`` fields as read (None where absent) as a Grant, or None
        if there is no record; GrantUnreadable as :meth:`decode`."""
        if version is None or not isinstance(blob, bytes):
            return None
        return self.decode(provider, user_id, version, blob)

    def decode(self, provider: str, user_id: str, version: bytes | str | int, blob: bytes) -> Grant:
        """A stored record (its ``v`` and ``blob`` fields) as a Grant; GrantUnreadable, counted,
        if it fails authentication or decryption."""
        try:
            payload = self.keyring.decrypt(blob, grant_aad(provider, user_id))
            return grant_record.decode(provider, user_id, int(version), payload)
        except GrantUnreadable as err:
            self._metrics.grants_unreadable.labels(provider).inc()
            security.error(
                "record.unreadable",
                kind="grant",
                provider=provider,
                user_id=user_id,
                key_id=record_key_id(blob) or "(unknown format)",
                reason=err.detail,
            )
            raise
