"""Every kind of encrypted record broker keeps in Redis, and walking them all with SCAN.

``broker rekey`` and the key census (``broker_records_by_key``) see records only through
``KINDS``: a new kind of encrypted record is one more line there, naming its SCAN pattern, where
its ciphertext lives (a hash field, or the whole value of a string key) and the associated data
it was encrypted with. Nothing here decrypts: callers hold the key ring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from broker.crypto import app_token_aad, authorization_aad, grant_aad
from broker.keys import Keys, member, user_id_of
from broker.redis_client import script

__all__ = ["KINDS", "Node", "RecordKind", "primaries", "read_blobs", "read_headers", "scan"]

Node = Any  # a redis-py ClusterNode, or None for a single server (or a Sentinel primary)


def _grant_aad(keys: Keys, key: str) -> bytes | None:
    parsed = keys.parse_grant_key(key)
    if parsed is None:
        return None
    provider, m = parsed
    try:
        user_id = user_id_of(m)
    except ValueError:  # a key that only looks like a grant's
        return None
    return grant_aad(provider, user_id) if member(user_id) == m else None


def _app_token_aad(keys: Keys, key: str) -> bytes | None:
    parsed = keys.parse_app_token_key(key)
    return None if parsed is None else app_token_aad(*parsed)


def _authorization_aad(keys: Keys, key: str) -> bytes | None:
    return authorization_aad(key)


@dataclass(frozen=True, slots=True)
class RecordKind:
    """One kind of encrypted record: ``pattern`` matches its keys (SCAN MATCH), ``field`` is the
    hash field holding its ciphertext ("" when the key is a string holding it), ``aad`` the
    associated data of a key (None: a key that only matches the pattern, not broker's)."""

    name: str
    pattern: Callable[[Keys], str]
    field: str
    aad: Callable[[Keys, str], bytes | None]


KINDS: tuple[RecordKind, ...] = (
    # grants in every state (active, refresh_failing, reauth_required) share one key shape
    RecordKind("grant", lambda keys: keys.grant_key_pattern(), "blob", _grant_aad),
    RecordKind("authorization", lambda keys: keys.authorization_key("*"), "", _authorization_aad),
    # app tokens (client credentials, broker/app_store.py)
    RecordKind("app_token", lambda keys: keys.app_token_pattern(), "blob", _app_token_aad),
)


async def primaries(redis: aioredis.Redis) -> list[Node]:
    """The nodes a full walk visits: each Redis Cluster primary (name order), else ``[None]``."""
    if isinstance(redis, RedisCluster):
        cluster: Any = await redis.initialize()  # learns the nodes on first use; then a no-op
        return sorted(cluster.get_primaries(), key=lambda node: str(node.name))
    return [None]


async def scan(
    redis: aioredis.Redis, node: Node, cursor: int, pattern: str, count: int
) -> tuple[int, list[str]]:
    """One SCAN call on ``node`` (never KEYS): the next cursor (0: done) and the keys found."""
    client: Any = redis
    if node is None:
        after, raw = await client.scan(cursor, match=pattern, count=count)
    else:
        cursors, raw = await client.scan(
            cursor=cursor, match=pattern, count=count, target_nodes=node
        )
        after = cursors[node.name]
    return int(after), [k.decode() if isinstance(k, bytes) else str(k) for k in raw]


async def read_headers(redis: aioredis.Redis, kind: RecordKind, keys: list[str]) -> list[Any]:
    """The start of each key's ciphertext, up to and with its key id (None for a key deleted
    since the scan): on one server a script cuts them out, so a census step costs one reply
    instead of a thousand; on a Redis Cluster the keys span slots, and whole ciphertexts are
    read."""
    if not keys or isinstance(redis, RedisCluster):
        return await read_blobs(redis, kind, keys)
    headers = redis.register_script(script("record_headers.lua"))
    return list(await headers(keys=keys, args=[kind.field]))


async def read_blobs(redis: aioredis.Redis, kind: RecordKind, keys: list[str]) -> list[Any]:
    """The ciphertext of each key, in one pipeline (None for a key deleted since the scan)."""
    if not keys:
        return []
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        if kind.field:
            pipe.hget(key, kind.field)
        else:
            pipe.get(key)
    return list(await pipe.execute())
