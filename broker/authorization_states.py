"""Pending authorizations as the flow sees them: what a ``state`` stands for between the start
and the callback, sealed (encrypted with the key ring, bound to its Redis key) under the SHA-256
of the state, and taken at most once."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import structlog

from broker.crypto import KeyRing, authorization_aad
from broker.errors import BrokerError, GrantUnreadable, InvalidState
from broker.keys import Keys
from broker.metrics import Metrics
from broker.pending import PendingAuthorizations

log = structlog.get_logger("broker.authorize")  # the flow's logger, as before this module

MAX_STATE_CHARS = 256  # longer is not ours: refused before touching Redis


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """What a state stands for between the start and the callback."""

    provider: str
    user_id: str
    scope: str
    redirect_after: str
    code_verifier: str | None = field(repr=False)
    created_at: float
    expires_at: float
    client: str | None = None  # who started it, for the audit log (absent in older records)

    def to_payload(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, payload: bytes) -> PendingAuthorization:
        try:
            return cls(**json.loads(payload))
        except (ValueError, TypeError) as err:
            raise InvalidState("the stored authorization is malformed") from err


def state_digest(state: str) -> str:
    """The Redis key part for a state: its SHA-256, so the store never holds the state."""
    return hashlib.sha256(state.encode("utf-8", errors="surrogatepass")).hexdigest()


class AuthorizationStates:
    def __init__(
        self,
        pending: PendingAuthorizations,
        keys: Keys,
        keyring: KeyRing,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pending = pending
        self._keys = keys
        self._keyring = keyring
        self._metrics = metrics
        self._clock = clock

    async def save(self, state: str, pending: PendingAuthorization, ttl: float) -> None:
        """Store ``pending`` under ``state`` for ``ttl`` seconds."""
        key = self._keys.authorization_key(state_digest(state))
        blob = self._keyring.encrypt(pending.to_payload(), authorization_aad(key))
        if not await self._pending.save(key, blob, ttl):
            raise BrokerError("a fresh random state collided with a pending one")

    async def take(self, provider: str, state: str) -> PendingAuthorization:
        """Consume the state's pending authorization, or InvalidState."""
        if not state or len(state) > MAX_STATE_CHARS:
            self._invalid(provider, "missing")
            raise InvalidState("the callback carries no usable state")
        key = self._keys.authorization_key(state_digest(state))
        blob = await self._pending.take(key)
        if blob is None:
            self._invalid(provider, "unknown")
            raise InvalidState("the authorization is unknown, expired or already used")
        try:
            pending = PendingAuthorization.from_payload(
                self._keyring.decrypt(blob, authorization_aad(key))
            )
        except (GrantUnreadable, InvalidState):
            log.error("security.authorization_unreadable", provider=provider)
            self._invalid(provider, "unreadable")
            raise InvalidState("the authorization record cannot be read") from None
        if pending.provider != provider:
            self._invalid(provider, "other_provider")
            raise InvalidState("the authorization was started for another provider")
        if self._clock() >= pending.expires_at:
            self._invalid(provider, "expired")
            raise InvalidState("the authorization has expired")
        return pending

    def _invalid(self, provider: str, reason: str) -> None:
        self._metrics.authorizations.labels(provider, "invalid_state").inc()
        log.warning("authorization.invalid_state", provider=provider, reason=reason)
