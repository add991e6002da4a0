"""Grant records in both plaintext formats: each reads what the other wrote, a newer version's
fields are skipped, garbage is unreadable, and replicas writing different formats share grants
(a rolling upgrade) without a reused or lost refresh token."""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from typing import Any

import msgpack
import pytest
import redis as syncredis

from broker import grant_record
from broker.config import parse_encryption_keys
from broker.crypto import KeyRing, grant_aad
from broker.devprovider import DevProvider
from broker.errors import GrantUnreadable
from broker.keys import Keys
from broker.models import Grant
from tests.conftest import BrokerFactory, RedisServer, encryption_key

NOW = time.time()
# What a grant looks like after a few refreshes: every timestamp set, as in production.
LIVE = Grant(
    provider="p",
    user_id="u",
    refresh_token="r" * 43,
    access_token="a" * 43,
    access_expires_at=NOW + 3600,
    access_issued_at=NOW,
    scope="openid offline_access",
    next_refresh_at=NOW + 3000,
    last_refreshed_at=NOW,
    refresh_count=17,
    refresh_token_issued_at=NOW,
    refresh_token_expires_at=NOW + 7 * 86400,
    created_at=NOW - 86400,
    updated_at=NOW,
    version=5,
)
VARIANTS = [
    LIVE,
    replace(LIVE, state="refresh_failing", consecutive_failures=3, last_error="http_500"),
    replace(LIVE, refresh_token=None, next_refresh_at=None),  # no refresh token (Cloud 66)
    # defaults and near-defaults: 0.0 is a default, 0.5 and "bearer" are not
    Grant(provider="p", user_id="u", refresh_token="rt", created_at=0.0, updated_at=0.5),
    replace(LIVE, token_type="bearer", access_token="lone \ud800 surrogate, as the provider sent"),
]


@pytest.mark.parametrize("record_format", [1, 2])
@pytest.mark.parametrize("grant", VARIANTS)
def test_each_format_gives_back_the_grant_it_was_given(grant: Grant, record_format: int) -> None:
    payload = grant_record.encode(grant, record_format)
    read = grant_record.decode("p", "u", grant.version, payload)
    assert read == grant
    assert [type(getattr(read, f.name)) for f in fields(Grant)] == [
        type(getattr(grant, f.name)) for f in fields(Grant)
    ]


def test_the_compact_format_is_under_half_the_size_of_json() -> None:
    json_size = len(grant_record.encode(LIVE, 1))
    compact_size = len(grant_record.encode(LIVE, 2))
    assert compact_size < json_size / 2, (compact_size, json_size)


def test_a_timestamp_equal_to_updated_at_takes_one_byte() -> None:
    """A refresh stamps several fields with the same instant: format 2 writes them as a mark."""
    shifted = replace(LIVE, access_issued_at=LIVE.updated_at - 1.0)
    assert len(grant_record.encode(shifted)) == len(grant_record.encode(LIVE)) + 8
    assert grant_record.decode("p", "u", 5, grant_record.encode(shifted)) == shifted


def test_every_stored_field_has_its_own_number() -> None:
    stored = {f.name for f in fields(Grant)} - {"provider", "user_id", "version"}
    assert set(grant_record.FIELD_NUMBERS) == stored
    assert len(set(grant_record.FIELD_NUMBERS.values())) == len(stored)


def test_the_defaults_format_2_leaves_out_never_change() -> None:
    """A record in format 2 does not hold a field at its default: changing a default of
    ``Grant`` would change what every such record says. Use a new format number instead."""
    assert grant_record.DEFAULTS == {
        "access_token": None,
        "token_type": "Bearer",
        "access_expires_at": None,
        "access_issued_at": None,
        "scope": None,
        "state": "active",
        "next_refresh_at": None,
        "last_refreshed_at": None,
        "refresh_count": 0,
        "consecutive_failures": 0,
        "last_error": None,
        "refresh_token_issued_at": None,
        "refresh_token_expires_at": None,
        "created_at": 0.0,
        "updated_at": 0.0,
    }


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"null",
        b"[]",
        b"{}",
        b"\x02",
        b"\x02\xc1",  # a byte MessagePack never uses
        b"\x02" + msgpack.packb([1, 2]),
        b"\x02" + msgpack.packb({}),  # no refresh token field at all
        b"\x02" + msgpack.packb({1: "rt", 7: "active"}) + b"trailing",
        b"\x02" + msgpack.packb({(1,): "rt"}),
    ],
)
def test_a_malformed_payload_is_unreadable(payload: bytes) -> None:
    with pytest.raises(GrantUnreadable):
        grant_record.decode("p", "u", 1, payload)


def test_a_record_from_a_newer_version_is_still_readable() -> None:
    """A rolling upgrade: a newer replica wrote a field this version does not know."""
    data = json.loads(grant_record.encode(LIVE, 1))
    data["field_from_the_future"] = {"x": 1}
    assert grant_record.decode("p", "u", 5, json.dumps(data).encode()) == LIVE
    compact = msgpack.unpackb(grant_record.encode(LIVE, 2)[1:], strict_map_key=False)
    compact[99] = {"x": 1}
    assert grant_record.decode("p", "u", 5, b"\x02" + msgpack.packb(compact)) == LIVE


def stored_format(server: RedisServer, prefix: str, key: str, user_id: str) -> int:
    """The plaintext format of the grant record in Redis: 1 (JSON) or 2 (compact)."""
    client = syncredis.Redis(port=server.port)
    blob = client.hget(Keys(prefix).grant_key("dev", user_id), "blob")
    client.close()
    assert isinstance(blob, bytes)
    payload = KeyRing(parse_encryption_keys(key)).decrypt(blob, grant_aad("dev", user_id))
    return 2 if payload[:1] == b"\x02" else 1


async def test_replicas_writing_either_format_share_grants_and_refresh_each_others(
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    """An upgrade in progress: a replica still writing format 1 and one writing format 2 serve
    and refresh the same grants, each reading what the other wrote."""
    key = encryption_key()
    common: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": key_prefix,
        "encryption_keys": key,
    }
    old = await make_broker(record_format=1, **common)
    new = await make_broker(record_format=2, **common)
    assert (await old.import_grant("u", refresh_token=provider.issue_refresh_token()))[0] == 201
    assert stored_format(redis_server, key_prefix, key, "u") == 1
    provider.reset_counters()
    tokens = []
    for replica, written in ((new, 2), (old, 1), (new, 2)):
        for each in (old, new):
            each.clock.advance(3600)  # the access token expired: the next request refreshes
        status, token = await replica.token("u")  # reads the other format, writes its own
        assert status == 200
        assert stored_format(redis_server, key_prefix, key, "u") == written
        tokens.append(token["access_token"])
    assert len(set(tokens)) == 3
    assert provider.refresh_requests == 3
    assert provider.reused_refresh_tokens == 0
