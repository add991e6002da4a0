"""Records in a real Redis that someone with write access changed: each is refused as
``500 grant_unreadable``, logged as a security event and counted, and never answered with
another user's token."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from broker.api import METRICS, STORE
from broker.crypto import NONCE_BYTES
from broker.store import GrantStore
from tests.conftest import SECRETS, Broker, BrokerFactory, RedisServer, path


def new_key(kid: str) -> str:
    material = base64.b64encode(os.urandom(32)).decode()
    SECRETS.add(material)
    return f"{kid}:{material}"


def unreadable_count(broker: Broker) -> float:
    value = broker.app[METRICS].registry.get_sample_value(
        "broker_grants_unreadable_total", {"provider": "dev"}
    )
    return value or 0.0


def security_events(log_file: Path, since: int) -> list[dict[str, object]]:
    with log_file.open(encoding="utf-8") as stream:
        stream.seek(since)
        lines = [json.loads(line) for line in stream if line.strip()]
    return [line for line in lines if line.get("event") == "security.grant_unreadable"]


async def assert_refused(broker: Broker, user_id: str, *never: str) -> None:
    """Every read of the grant answers 500 grant_unreadable and shows none of ``never``."""
    for method, url in [
        ("GET", path("tokens", user_id)),
        ("GET", path("grants", user_id)),
        ("POST", path("tokens", user_id) + "/refresh"),
    ]:
        body = {"json": {"rejected_token": "at-anything"}} if method == "POST" else {}
        status, answer, _ = await broker.call(method, url, **body)
        assert (status, answer["code"]) == (500, "grant_unreadable"), (url, answer)
        for secret in never:
            assert secret not in json.dumps(answer)


@pytest.fixture
async def broker(make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str) -> Broker:
    return await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)


async def test_records_swapped_between_two_users_are_refused(
    broker: Broker, log_file: Path
) -> None:
    """The whole hashes trade places (version, blob, everything): the identity bound into
    each ciphertext no longer matches its key."""
    await broker.import_grant("alice", refresh_token="rt-a", access_token="at-alice-6f2")
    await broker.import_grant("bob", refresh_token="rt-b", access_token="at-bob-91c")
    store: GrantStore = broker.app[STORE]
    alice, bob = store.keys.grant_key("dev", "alice"), store.keys.grant_key("dev", "bob")
    swap = f"{alice}:swap"
    await store.redis.rename(alice, swap)
    await store.redis.rename(bob, alice)
    await store.redis.rename(swap, bob)
    since, before = log_file.stat().st_size, unreadable_count(broker)

    await assert_refused(broker, "alice", "at-bob-91c", "rt-b")
    await assert_refused(broker, "bob", "at-alice-6f2", "rt-a")

    assert unreadable_count(broker) - before == 6
    events = security_events(log_file, since)
    assert len(events) == 6
    assert {e["level"] for e in events} == {"error"}
    assert all("failed authentication" in str(e["reason"]) for e in events)


def flip(blob: bytes, where: str) -> bytes:
    """``blob`` with one bit flipped: 0x01 | len(kid) | kid | nonce | ciphertext | tag."""
    start = 2 + blob[1]
    index = {
        "format": 0,
        "key id": 2,
        "nonce": start,
        "ciphertext": start + NONCE_BYTES + 3,
        "tag": len(blob) - 1,
    }[where]
    changed = bytearray(blob)
    changed[index] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("where", ["format", "key id", "nonce", "ciphertext", "tag"])
async def test_a_flipped_bit_is_refused(broker: Broker, log_file: Path, where: str) -> None:
    await broker.import_grant("u", refresh_token="rt-u", access_token="at-u-3e7")
    store: GrantStore = broker.app[STORE]
    key = store.keys.grant_key("dev", "u")
    blob = await store.redis.hget(key, "blob")
    assert isinstance(blob, bytes)
    await store.redis.hset(key, "blob", flip(blob, where))
    since, before = log_file.stat().st_size, unreadable_count(broker)

    await assert_refused(broker, "u", "at-u-3e7", "rt-u")

    assert unreadable_count(broker) - before == 3
    assert len(security_events(log_file, since)) == 3


async def test_a_record_under_a_removed_key_is_refused(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str, log_file: Path
) -> None:
    old, new = new_key("kold"), new_key("knew")
    common = {"redis_url": redis_server.url, "key_prefix": key_prefix}
    before_rotation = await make_broker(encryption_keys=old, **common)
    await before_rotation.import_grant("u", refresh_token="rt-u", access_token="at-u-c41")
    removed_too_early = await make_broker(encryption_keys=new, **common)
    since = log_file.stat().st_size

    await assert_refused(removed_too_early, "u", "at-u-c41", "rt-u", old[5:])

    assert unreadable_count(removed_too_early) == 3
    events = security_events(log_file, since)
    assert len(events) == 3
    assert all("'kold', which is not configured" in str(e["reason"]) for e in events)
    # Both keys again: readable (the key was removed too early, nothing was lost).
    both = await make_broker(encryption_keys=f"{new},{old}", **common)
    status, token = await both.token("u")
    assert (status, token["access_token"]) == (200, "at-u-c41")
