"""App tokens (client-credentials grant) in Redis: encrypted records and their schedule.

One record per (provider, scope set), a hash ``{prefix}:{app:<provider>:<scope id>}:token`` in
the grants' record format (``v`` version, ``blob`` the AES-GCM record under the key ring with
associated data ``app_token_aad(provider, scope id)``, ``due``, ``st``) written by a fenced
script like the grants' (without their events), so ``broker rekey`` can re-encrypt it like a
grant (SCAN
``Keys.app_token_pattern()``). One more field, ``used`` (clear; not a secret), says when a
client last got the token: the scheduler refreshes only tokens handed out since their last
refresh, so a scope set nobody asks for any more costs nothing after one lifetime, and its
record expires (Redis TTL) a day after its token.

The scope id is base64url(SHA-256(normalised scope)): fixed length, free of ``{``, ``}`` and
``:``. The record's lock is ``...:lock`` beside it (same hash tag). The schedule is one sorted
set, ``{prefix}:app-schedule``, members ``<provider>:<scope id>`` scored by due time: its size
is the number of (provider, scope) records, never the number of user grants.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import redis.asyncio as aioredis
import structlog

from broker.crypto import KeyRing, app_token_aad
from broker.errors import GrantUnreadable, InvalidRequest, StoreUnavailable
from broker.keys import Keys
from broker.metrics import Metrics
from broker.models import GrantState, TokenSet
from broker.redis_client import Guard, script

log = structlog.get_logger(__name__)

SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3
# Fits the request line however it is percent-encoded (aiohttp reads at most 8190 bytes).
MAX_APP_SCOPE_CHARS = 512
RECORD_GRACE = 86400.0  # a record outlives its token by this much, then Redis drops it


def normalise_scope(raw: str | None) -> str:
    """The scope set as one canonical string (sorted, no duplicates); "" for none."""
    if raw is None:
        return ""
    if len(raw) > MAX_APP_SCOPE_CHARS:
        raise InvalidRequest(f"scope must be at most {MAX_APP_SCOPE_CHARS} characters")
    tokens = {part for part in raw.split(" ") if part}
    if any(not SCOPE_TOKEN.fullmatch(token) for token in tokens):
        raise InvalidRequest("scope must be space-separated scope tokens (RFC 6749 §3.3)")
    return " ".join(sorted(tokens))


def scope_id(scope: str) -> str:
    digest = hashlib.sha256(scope.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class AppToken:
    """The access token held for one (provider, normalised scope)."""

    provider: str
    scope: str  # as requested, normalised: the record's identity
    access_token: str = field(repr=False)
    token_type: str = "Bearer"
    access_expires_at: float = 0.0
    access_issued_at: float = 0.0  # when we asked (lifetimes count from there)
    granted_scope: str | None = None  # as the provider answered
    state: GrantState = "active"  # never reauth_required: there is no grant to lose
    next_refresh_at: float | None = None
    refresh_count: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0

    def valid_for(self, now: float) -> float:
        return self.access_expires_at - now

    def lifetime(self) -> float | None:
        return self.access_expires_at - self.access_issued_at

    def with_failure(
        self, reason: str, now: float, *, retry_at: float, failing_after: int
    ) -> AppToken:
        """The record after a failed request: its token kept, tried again at ``retry_at``;
        ``refresh_failing`` after ``failing_after`` failures in a row or once it has expired."""
        failures = self.consecutive_failures + 1
        failing = failures >= failing_after or self.valid_for(now) <= 0
        return replace(
            self,
            state="refresh_failing" if failing else self.state,
            consecutive_failures=failures,
            last_error=reason,
            next_refresh_at=retry_at,
            updated_at=now,
            version=self.version + 1,
        )

    def to_payload(self) -> bytes:
        data = asdict(self)
        for key in ("provider", "version"):
            del data[key]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, provider: str, version: int, payload: bytes) -> AppToken:
        try:
            data = json.loads(payload)
            if not isinstance(data, dict):
                raise TypeError("an app token record is a JSON object")
            known = {f.name for f in fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            return cls(provider=provider, version=version, **data)
        except (ValueError, TypeError) as err:
            raise GrantUnreadable("stored app token record is malformed") from err


def issued(
    provider: str, scope: str, tokens: TokenSet, stored: Stored, *, requested_at: float, due: float
) -> AppToken:
    """The record holding the token the provider just issued, replacing ``stored``.
    Lifetimes count from ``requested_at``: the provider's clock started no earlier."""
    old = stored.token
    return AppToken(
        provider=provider,
        scope=scope,
        access_token=tokens.access_token,
        token_type=tokens.token_type,
        access_expires_at=requested_at + tokens.expires_in,
        access_issued_at=requested_at,
        granted_scope=tokens.scope if tokens.scope is not None else (scope or None),
        next_refresh_at=due,
        refresh_count=(old.refresh_count + 1) if old is not None else 0,
        created_at=old.created_at if old is not None else requested_at,
        updated_at=requested_at,
        version=stored.version + 1,
    )


@dataclass(frozen=True, slots=True)
class Stored:
    """What a read found: the record (None if absent or unreadable), the version to fence a
    write on, and when the token was last handed out (0 if never)."""

    token: AppToken | None
    version: int
    used: float


class AppTokenStore:
    def __init__(
        self, redis: aioredis.Redis, keyring: KeyRing, keys: Keys, guard: Guard, metrics: Metrics
    ) -> None:
        self.redis = redis
        self.keys = keys
        self._guard = guard
        self._keyring = keyring
        self._metrics = metrics
        self._fenced_write = redis.register_script(script("app_fenced_write.lua"))
        self._claim = redis.register_script(script("claim_due.lua"))
        self._move = redis.register_script(script("move_lease.lua"))
        self._used = redis.register_script(script("app_token_used.lua"))

    async def read(self, provider: str, sid: str) -> Stored:
        """The record; an unreadable one (tampering, a key removed too early) counts as absent,
        logged and counted: a new token replaces it, and nothing of it is served."""
        with self._guard("read"):
            version, blob, used = await self.redis.hmget(
                self.keys.app_token_key(provider, sid), ["v", "blob", "used"]
            )
        if version is None or not isinstance(blob, bytes):
            return Stored(None, 0, 0.0)
        seen = float(used) if used is not None else 0.0
        try:
            payload = self._keyring.decrypt(blob, app_token_aad(provider, sid))
            token = AppToken.from_payload(provider, int(version), payload)
            if scope_id(token.scope) != sid:
                raise GrantUnreadable("app token record names another scope")
        except GrantUnreadable as err:
            self._metrics.grants_unreadable.labels(provider).inc()
            log.error("security.app_token_unreadable", provider=provider, problem=err.detail)
            return Stored(None, int(version), seen)
        return Stored(token, int(version), seen)

    async def write(self, token: AppToken, expected_version: int) -> bool:
        """Store ``token`` if the record is still at ``expected_version`` (fenced like grants),
        then schedule its refresh; False if another writer got there first."""
        sid = scope_id(token.scope)
        blob = self._keyring.encrypt(token.to_payload(), app_token_aad(token.provider, sid))
        due = "" if token.next_refresh_at is None else repr(token.next_refresh_at)
        version = str(token.version)
        args: list[str | bytes] = [str(expected_version), version, blob, due, token.state]
        with self._guard("write"):
            written = await self._fenced_write(
                keys=[self.keys.app_token_key(token.provider, sid)], args=args
            )
        if not written:
            return False
        # Best effort: the schedule (a lost entry: fetched on demand later), and the record's
        # own expiry, so records of scope sets nobody asks for any more do not pile up.
        keep = token.access_expires_at - token.updated_at + RECORD_GRACE
        pipe = self.redis.pipeline(transaction=False)
        pipe.pexpire(self.keys.app_token_key(token.provider, sid), max(1, int(keep * 1000)))
        if token.next_refresh_at is not None:
            pipe.zadd(
                self.keys.app_schedule_key(), {member(token.provider, sid): token.next_refresh_at}
            )
        try:
            with self._guard("index"):
                await pipe.execute()
        except StoreUnavailable:
            log.warning("app_token.schedule_failed", provider=token.provider)
        return True

    async def mark_used(self, provider: str, sid: str, now: float) -> None:
        """Note a handout (best effort: at worst the token is fetched on demand later)."""
        try:
            with self._guard("write"):
                await self._used(keys=[self.keys.app_token_key(provider, sid)], args=[repr(now)])
        except StoreUnavailable:
            log.warning("app_token.use_not_recorded", provider=provider)

    async def claim_due(self, now: float, lease_until: float, limit: int) -> list[tuple[str, str]]:
        """(provider, scope id) of up to ``limit`` due records, leased until ``lease_until``."""
        with self._guard("claim"):
            members: list[Any] = await self._claim(
                keys=[self.keys.app_schedule_key()], args=[now, lease_until, limit]
            )
        claimed = []
        for raw in members:
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            provider, _, sid = text.rpartition(":")
            claimed.append((provider, sid))
        return claimed

    async def move_lease(self, provider: str, sid: str, lease: float, to: float | None) -> bool:
        """Move our claim to ``to`` (None: off the schedule), unless a write rescheduled it."""
        with self._guard("claim"):
            moved = await self._move(
                keys=[self.keys.app_schedule_key()],
                args=[member(provider, sid), repr(lease), "" if to is None else repr(to)],
            )
        return bool(moved)


def member(provider: str, sid: str) -> str:
    return f"{provider}:{sid}"
