"""Listing one provider's grants a page at a time, at a cost that does not grow with the number
of grants stored.

Without a state filter, and for ``active``, a page walks the provider's grant keys with
``SCAN ... MATCH {prefix}:{<provider>:*}:grant`` (on a Redis Cluster, node by node, primaries in
name order); for ``refresh_failing`` and ``reauth_required`` it walks the state set with
``SSCAN``. A page makes at most ``MAX_SCANS_PER_PAGE`` scan calls, each followed by one pipelined
read of the records it found, and decrypts at most ``limit`` of them. Records are filtered by
the state written in clear beside them (``st``) and again by the decrypted record.

The cursor is opaque to clients: base64url of ``1.<provider>.<state>.<node>.<redis cursor>.
<after>.<then>``. One Redis scan call may return more than a page holds (a small set comes back
whole), so the next page repeats that call and skips its members up to ``after`` (the last one
handed out, in sorted order). That is exact only if the repeated call covers the same hash
buckets, which it does when it answers the same next cursor (``then``) as the first time; when
it answers another, nothing is skipped (the members up to ``after`` come again). Whatever
changes meanwhile, every grant that exists throughout a listing appears at least once (the
SCAN guarantee); one may appear more than once, and a page may be shorter than ``limit``, even
empty, with a ``next_cursor``. Only a null ``next_cursor`` ends a listing. On a Redis Cluster
the cursor holds the index of the primary being scanned: a resharding or failover during a
listing voids that guarantee (start again).

Records that fail decryption are left out of pages and reported beside them (their user ids,
for the CLI; the API shows nothing of them), counted in ``broker_grants_unreadable`` and logged
as a security event, as a read of that grant would.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, get_args

import structlog
from redis.asyncio.cluster import RedisCluster

from broker.errors import GrantUnreadable, InvalidRequest
from broker.keys import member, user_id_of
from broker.models import Grant, GrantState
from broker.store import GrantStore

log = structlog.get_logger(__name__)

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "GrantListing",
    "GrantPage",
    "decode_cursor",
    "encode_cursor",
]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_SCANS_PER_PAGE = 4
MIN_SCAN_COUNT = 20  # SCAN's COUNT: how many keys one call examines, about
CURSOR_VERSION = "1"
MAX_CURSOR_CHARS = 1024
STATES: tuple[GrantState, ...] = get_args(GrantState)
INDEXED_STATES = ("refresh_failing", "reauth_required")  # states with a set of their own
_CURSOR = re.compile(r"[A-Za-z0-9_-]+")
_MEMBER = re.compile(r"[A-Za-z0-9_-]{1,400}")
_NUMBER = re.compile(r"0|[1-9][0-9]{0,19}")


@dataclass(frozen=True, slots=True)
class Position:
    """Where a listing stands: a Redis scan ``cursor`` on cluster ``node`` (0 off a cluster);
    with ``after``, the members up to it of that call's batch, which answered ``then`` as its
    next cursor, were handed out already."""

    node: int = 0
    cursor: int = 0
    after: str = ""
    then: int = 0


@dataclass(frozen=True, slots=True)
class GrantPage:
    """One page: the grants, the cursor of the next page (None: the listing is complete), and
    the user ids of records skipped because they could not be decrypted."""

    grants: tuple[Grant, ...]
    next_cursor: str | None
    unreadable: tuple[str, ...] = ()


def encode_cursor(provider: str, state: GrantState | None, at: Position) -> str:
    """The opaque cursor for a position of one listing."""
    fields = [CURSOR_VERSION, provider, state or "all", str(at.node), str(at.cursor)]
    text = ".".join([*fields, at.after, str(at.then)])
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str, provider: str, state: GrantState | None) -> Position:
    """The position a cursor of this listing (provider and state) names; InvalidRequest for
    anything else."""
    refusal = InvalidRequest("cursor is malformed: pass next_cursor of the previous page as is")
    if len(cursor) > MAX_CURSOR_CHARS or not _CURSOR.fullmatch(cursor):
        raise refusal
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise refusal from None
    parts = text.split(".")
    if len(parts) != 7 or parts[0] != CURSOR_VERSION:
        raise refusal
    _, of_provider, of_state, node, position, after, then = parts
    if not all(_NUMBER.fullmatch(n) for n in (node, position, then)):
        raise refusal
    if after and not _MEMBER.fullmatch(after):
        raise refusal
    if int(node) > 9999 or int(position) >= 2**64 or int(then) >= 2**64:
        raise refusal
    if (of_provider, of_state) != (provider, state or "all"):
        raise InvalidRequest("cursor belongs to another listing (another provider or state)")
    return Position(int(node), int(position), after, int(then))


class GrantListing:
    """Pages of one provider's grants, straight from the store."""

    def __init__(self, store: GrantStore) -> None:
        self._store = store

    async def page(
        self,
        provider: str,
        state: GrantState | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> GrantPage:
        """Up to ``limit`` grants of ``provider`` (in ``state`` when given), from ``cursor``
        on; at most ``MAX_SCANS_PER_PAGE`` scan calls whatever the number of grants."""
        at = Position() if cursor is None else decode_cursor(cursor, provider, state)
        with self._store.guard("list"):
            nodes = self._nodes(state)
            if at.node >= len(nodes):
                raise InvalidRequest("cursor names a Redis node this store no longer has")
            grants: list[Grant] = []
            unreadable: list[str] = []
            next_at: Position | None = at
            for _ in range(MAX_SCANS_PER_PAGE):
                if next_at is None or len(grants) >= limit:
                    break
                at = next_at
                room = limit - len(grants)
                count = max(room, MIN_SCAN_COUNT)
                after_call, members = await self._scan(provider, state, nodes, at, count)
                skip = at.after if after_call == at.then else ""
                batch = sorted({m for m in members if m > skip})
                taken, last = await self._take(provider, state, batch, room, unreadable)
                grants += taken
                if last is not None and last != batch[-1]:  # this batch is not done
                    next_at = Position(at.node, at.cursor, last, after_call)
                elif after_call != 0:
                    next_at = Position(at.node, after_call)
                elif at.node + 1 < len(nodes):
                    next_at = Position(at.node + 1)
                else:
                    next_at = None
        return GrantPage(
            tuple(grants),
            None if next_at is None else encode_cursor(provider, state, next_at),
            tuple(unreadable),
        )

    def _nodes(self, state: GrantState | None) -> list[Any]:
        """The cluster primaries a key scan visits in turn (name order); ``[None]`` when the
        scan is of one key (a state set) or off a cluster."""
        redis: Any = self._store.redis
        if state in INDEXED_STATES or not isinstance(redis, RedisCluster):
            return [None]
        return sorted(redis.get_primaries(), key=lambda node: str(node.name))

    async def _scan(
        self,
        provider: str,
        state: GrantState | None,
        nodes: list[Any],
        at: Position,
        count: int,
    ) -> tuple[int, list[str]]:
        """One scan call from ``at``: the next Redis cursor and the members it returned."""
        redis: Any = self._store.redis
        keys = self._store.keys
        if state in INDEXED_STATES:
            after, raw = await redis.sscan(keys.state_key(provider, state), at.cursor, count=count)
            return int(after), [_text(m) for m in raw]
        pattern = keys.grant_key_pattern(provider)
        node = nodes[at.node]
        if node is None:
            after, raw = await redis.scan(at.cursor, match=pattern, count=count)
        else:
            cursors, raw = await redis.scan(
                cursor=at.cursor, match=pattern, count=count, target_nodes=node
            )
            after = cursors[node.name]
        members = []
        for key in raw:
            parsed = keys.parse_grant_key(key)
            if parsed is not None and parsed[0] == provider:
                members.append(parsed[1])
        return int(after), members

    async def _take(
        self,
        provider: str,
        state: GrantState | None,
        batch: list[str],
        room: int,
        unreadable: list[str],
    ) -> tuple[list[Grant], str | None]:
        """Up to ``room`` grants of ``batch`` (sorted members) in ``state``, and the last
        member looked at (None when the batch was empty)."""
        if not batch:
            return [], None
        keys = self._store.keys
        pipe = self._store.redis.pipeline(transaction=False)
        for m in batch:
            pipe.hmget(keys.member_grant_key(provider, m), ["v", "blob", "st"])
        rows = await pipe.execute()
        taken: list[Grant] = []
        last = batch[-1]
        for m, (version, blob, st) in zip(batch, rows, strict=True):
            if len(taken) >= room:
                break
            last = m
            if version is None or not isinstance(blob, bytes):
                continue  # deleted since the scan
            if state is not None and st is not None and _text(st) != state:
                continue
            grant = self._decode(provider, m, version, blob, unreadable)
            if grant is not None and (state is None or grant.state == state):
                taken.append(grant)
        return taken, last

    def _decode(
        self, provider: str, m: str, version: bytes, blob: bytes, unreadable: list[str]
    ) -> Grant | None:
        try:
            user_id = user_id_of(m)
        except ValueError:  # a key that only looks like a grant's
            return None
        if member(user_id) != m:
            return None  # not base64url as broker writes it: not a grant of broker's
        try:
            return self._store.codec.decode(provider, user_id, version, blob)
        except GrantUnreadable as err:
            log.error(
                "security.grant_unreadable",
                provider=provider,
                user_id=user_id,
                reason=err.detail,
                trigger="list",
            )
            unreadable.append(user_id)
            return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
