"""The names of broker's Redis keys, and user ids as key parts.

Keys of one grant share a hash tag, ``{prefix}:{<provider>:<base64url(user id)>}:...``, so
multi-key scripts stay within one Redis Cluster slot. base64url without padding is injective and
contains no ``{`` or ``}``, so two user ids never share a key whatever characters they hold.
Suffixes (``:grant``, ``:lock``, ``:token``, ``:bucket``) keep every kind of key apart.
"""

from __future__ import annotations

import base64
import re
import zlib

_MEMBER = re.compile(r"[A-Za-z0-9_-]+")  # base64url without padding


def member(user_id: str) -> str:
    """A user id as a key part: base64url without padding, injective and brace-free."""
    return base64.urlsafe_b64encode(user_id.encode()).rstrip(b"=").decode()


def user_id_of(encoded: bytes | str) -> str:
    text = encoded.decode() if isinstance(encoded, bytes) else encoded
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


class Keys:
    """The names of broker's Redis keys, in one place."""

    def __init__(self, prefix: str = "broker", schedule_shards: int = 1) -> None:
        self._prefix = prefix
        self._shards = schedule_shards

    def _tag(self, provider: str, user_id: str) -> str:
        return f"{self._prefix}:{{{provider}:{member(user_id)}}}"

    def schedule_key(self, provider: str, shard: int = 0) -> str:
        base = f"{self._prefix}:schedule:{provider}"
        return base if shard == 0 else f"{base}:{shard}"

    def schedule_of(self, provider: str, m: str) -> str:
        """The shard holding member ``m``: with ``schedule_shards`` > 1 one provider's schedule
        spreads over several keys, so over several Redis Cluster slots."""
        return self.schedule_key(provider, zlib.crc32(m.encode()) % self._shards)

    def state_key(self, provider: str, state: str) -> str:
        return f"{self._prefix}:state:{state}:{provider}"

    def authorization_key(self, state_hash: str) -> str:
        return f"{self._prefix}:authz:{state_hash}"

    def census_key(self) -> str:
        """The published count of records per encryption key id (``broker/census.py``)."""
        return f"{self._prefix}:records-by-key"

    def incarnations_key(self) -> str:
        return f"{self._prefix}:incarnations"

    def events_key(self) -> str:
        """The stream of grant events (docs/webhooks.md)."""
        return f"{self._prefix}:events"

    def changes_channel(self) -> str:
        """The pub/sub channel every grant write and delete publishes its key on."""
        return f"{self._prefix}:grant-changes"

    def encrypting_key(self, process: str) -> str:
        """A serving process's entry naming the key it encrypts with (``broker/key_roster.py``)."""
        return f"{self._prefix}:encrypting:{process}"

    def rt_expiry_key(self, provider: str) -> str:
        return f"{self._prefix}:rt-expiry:{provider}"

    def grant_key(self, provider: str, user_id: str) -> str:
        return self._tag(provider, user_id) + ":grant"

    def member_grant_key(self, provider: str, m: str) -> str:
        """The grant key of a member (base64url user id) as scans and indexes hold it."""
        return f"{self._prefix}:{{{provider}:{m}}}:grant"

    def grant_key_pattern(self, provider: str | None = None) -> str:
        """A SCAN pattern matching every grant key of this prefix, or of one provider (neither
        a prefix nor a provider name can hold a glob character)."""
        if provider is None:
            return f"{self._prefix}:{{*}}:grant"
        return f"{self._prefix}:{{{provider}:*}}:grant"

    def parse_grant_key(self, key: bytes | str) -> tuple[str, str] | None:
        """(provider, member) of a grant key, or None for a key that only looks like one."""
        text = key.decode() if isinstance(key, bytes) else key
        head, tail = f"{self._prefix}:{{", "}:grant"
        if not (text.startswith(head) and text.endswith(tail)):
            return None
        provider, _, m = text[len(head) : -len(tail)].rpartition(":")
        if not provider or not m or not _MEMBER.fullmatch(m):
            return None
        return provider, m

    def lock_key(self, provider: str, user_id: str) -> str:
        return self._tag(provider, user_id) + ":lock"

    def rate_limit_key(self, client: str) -> str:
        """A client's token bucket; its name base64url-encoded, as a hash tag of its own."""
        return f"{self._prefix}:{{ratelimit:{member(client)}}}:bucket"

    def app_token_key(self, provider: str, scope_id: str) -> str:
        """An app token record (``broker/app_store.py``); its lock shares the hash tag."""
        return f"{self._prefix}:{{app:{provider}:{scope_id}}}:token"

    def app_token_pattern(self) -> str:
        """A SCAN pattern matching every app token record of this prefix."""
        return f"{self._prefix}:{{app:*}}:token"

    def parse_app_token_key(self, key: str) -> tuple[str, str] | None:
        """(provider, scope id) of an app token record's key, or None for a key that only looks
        like one."""
        head, tail = f"{self._prefix}:{{app:", "}:token"
        if not (key.startswith(head) and key.endswith(tail)):
            return None
        provider, _, scope_id = key[len(head) : -len(tail)].partition(":")
        if not provider or not _MEMBER.fullmatch(scope_id):
            return None
        return provider, scope_id

    def app_lock_key(self, provider: str, scope_id: str) -> str:
        return f"{self._prefix}:{{app:{provider}:{scope_id}}}:lock"

    def app_schedule_key(self) -> str:
        return f"{self._prefix}:app-schedule"
