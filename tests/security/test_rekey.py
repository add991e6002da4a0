"""``broker rekey`` against a real Redis while two replicas serve and refresh against the strict
dev provider (a refresh token presented twice revokes the grant)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from broker.api import KEYRING, STORE
from broker.crypto import grant_aad
from broker.devprovider import DevProvider
from broker.key_roster import ROSTER_TTL, encrypting
from broker.records import KINDS, RecordKind
from broker.rekey import Rekeyer
from broker.store import GrantStore
from tests.conftest import FAST_SCHEDULER as FAST
from tests.conftest import (
    Broker,
    BrokerFactory,
    Landing,
    RedisServer,
    eventually,
    follow,
    free_port,
    start_authorization,
)
from tests.security.rekeying import key_ids, mid_rotation, new_key, run_rekey
from tests.test_grant_listing import grant, seed

USERS = 120


def store_of(broker: Broker) -> GrantStore:
    return broker.app[STORE]


async def traffic(brokers: list[Broker], users: list[str], stop: asyncio.Event) -> list[int]:
    """Token requests that force refreshes (min_ttl above what is held), on both replicas in
    turn, until ``stop``; the statuses seen."""
    statuses: list[int] = []
    i = 0
    while not stop.is_set():
        broker = brokers[i % len(brokers)]
        status, _ = await broker.token(users[i % len(users)], min_ttl=5)
        statuses.append(status)
        i += 1
    return statuses


async def test_rekey_while_two_replicas_serve_and_refresh(
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
    landing: Landing,
    browser: aiohttp.ClientSession,
) -> None:
    old, new = new_key("kold"), new_key("knew")
    port = free_port()
    common: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": key_prefix,
        "public_url": f"http://127.0.0.1:{port}",
        "redirect_allowlist": [landing.url + "/"],
    }
    provider.settings.access_token_ttl = 8
    before = await make_broker(encryption_keys=old, **common)
    users = [f"u-{i}" for i in range(USERS)]
    for user in users:
        status, _ = await before.import_grant(
            user, refresh_token=provider.issue_refresh_token(user)
        )
        assert status == 201
    # a grant in reauth_required, one in refresh_failing, and a pending authorization
    await before.import_grant("gone", refresh_token=provider.issue_refresh_token("gone"))
    await before.import_grant("failing", refresh_token=provider.issue_refresh_token("failing"))
    before.clock.advance(3600)
    provider.fail_next("invalid_grant")
    assert (await before.token("gone"))[0] == 409
    provider.fail_next("server_error")
    assert (await before.token("failing"))[0] == 503
    assert (await before.grant("failing"))[1]["state"] == "refresh_failing"
    status, started = await start_authorization(before, "newcomer", landing.url + "/done")
    assert status == 201
    assert await key_ids(store_of(before).redis, store_of(before).keys) == {"kold": USERS + 3}

    rotated = {**common, "encryption_keys": f"{new},{old}", **FAST}
    replicas = [
        await make_broker(port=port, **rotated),
        await make_broker(**rotated),
    ]
    refreshes = provider.refresh_requests
    await eventually(
        lambda: _true(provider.refresh_requests > refreshes + 10), "background refreshes", 20
    )
    # `before` still serves with the old key first (the rollout has not finished): refused
    refused = await run_rekey(replicas[0].settings)
    assert refused.status == 4, refused.err
    assert "(kold)" in refused.err
    assert "nothing was re-encrypted" in refused.err
    await before.client.close()  # the rollout finishes: its entry goes with it
    stop = asyncio.Event()
    load = asyncio.create_task(traffic(replicas, users, stop))
    try:
        during = provider.refresh_requests
        run = await run_rekey(replicas[0].settings)
        during = provider.refresh_requests - during
        refreshes = provider.refresh_requests
        await eventually(
            lambda: _true(provider.refresh_requests > refreshes + 10), "refreshes after", 20
        )
    finally:
        stop.set()
        statuses = await load
    assert run.status == 0, run.err
    assert "every record is under key knew" in run.out
    assert during > 0  # the replicas refreshed (rotating refresh tokens) while it ran
    assert set(statuses) == {200}
    assert provider.reused_refresh_tokens == 0
    store = store_of(replicas[0])
    assert await key_ids(store.redis, store.keys) == {"knew": USERS + 3}

    # the old key goes: every grant still decrypts, the pending authorization still completes
    for replica in replicas:
        await replica.client.close()
    after = await make_broker(encryption_keys=new, port=port, **common)
    for user in users:
        status, body = await after.token(user)
        assert status == 200, body
    assert (await after.grant("gone"))[1]["state"] == "reauth_required"
    assert (await after.grant("failing"))[0] == 200
    journey = await follow(browser, started["authorization_url"])
    assert journey.query["status"] == "connected"
    assert provider.reused_refresh_tokens == 0


async def _true(value: bool) -> bool:
    return value


async def test_a_record_written_between_read_and_swap_is_not_overwritten(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    replica = await mid_rotation(
        make_broker, redis_server.url, key_prefix, [grant("racer"), grant("calm")]
    )
    store = store_of(replica)
    rekeyer = Rekeyer(store.redis, store.keys, replica.app[KEYRING])
    swap = rekeyer._replace

    async def racing(kind: RecordKind, key: str, old_blob: bytes, new_blob: bytes) -> bool:
        if key == store.keys.grant_key("dev", "racer"):  # a replica writes between read and swap
            status, _ = await replica.import_grant(
                "racer", refresh_token="rt-newer", access_token="at-newer", expires_in=600
            )
            assert status == 200
        return await swap(kind, key, old_blob, new_blob)

    rekeyer._replace = racing  # type: ignore[method-assign,assignment]
    report = await rekeyer.run()
    assert (report.rewritten, report.changed, report.remaining) == (1, 1, 0)
    assert report.clean
    assert (await replica.token("racer"))[1]["access_token"] == "at-newer"
    assert (await replica.token("calm"))[1]["access_token"] == "at-calm"
    assert await key_ids(store.redis, store.keys) == {"knew": 2}


async def test_a_refresh_in_flight_during_the_rekey_still_stores_its_rotated_token(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """The swap keeps the grant's version: the fence a refresh holds while it waits for the
    provider still matches, so the rotated refresh token it receives is stored."""
    old, new = new_key("kold"), new_key("knew")
    common = {"redis_url": redis_server.url, "key_prefix": key_prefix}
    provider.settings.access_token_ttl = 60
    before = await make_broker(encryption_keys=old, **common)
    await before.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    await before.client.close()  # the old configuration is gone before the rekey
    replica = await make_broker(encryption_keys=f"{new},{old}", **common)
    replica.clock.advance(50)  # 10 s left: asking for 30 refreshes
    requests = provider.token_requests
    provider.hold()
    in_flight = asyncio.create_task(replica.token("u", min_ttl=30))
    await provider.wait_for_token_requests(requests + 1)
    run = await run_rekey(replica.settings)
    assert run.status == 0, run.err
    assert _row(run.out, "rewritten") == 1
    provider.release()
    status, body = await in_flight
    assert status == 200, body
    assert (await replica.grant("u"))[1]["refresh_count"] == 2
    replica.clock.advance(55)
    status, _ = await replica.token("u", min_ttl=30)  # the rotated token was kept: it works
    assert status == 200
    assert (await replica.grant("u"))[1]["refresh_count"] == 3
    assert provider.reused_refresh_tokens == 0
    store = store_of(replica)
    assert await key_ids(store.redis, store.keys) == {"knew": 1}


async def test_the_swap_script_replaces_only_the_exact_ciphertext_read(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    store = store_of(broker)
    keyring = broker.app[KEYRING]
    await seed(broker, [grant("u")])
    key = store.keys.grant_key("dev", "u")
    stored = await store.redis.hgetall(key)
    rekeyer = Rekeyer(store.redis, store.keys, keyring)
    kinds = {kind.name: kind for kind in KINDS}
    kind, authz = kinds["grant"], kinds["authorization"]  # a hash field; a string key
    other = keyring.encrypt(b"{}", grant_aad("dev", "u"))
    assert not await rekeyer._replace(kind, key, other, b"new")  # not what is stored
    assert await store.redis.hgetall(key) == stored
    blob = stored[b"blob"]
    assert isinstance(blob, bytes)
    assert await rekeyer._replace(kind, key, blob, b"new")
    assert await store.redis.hgetall(key) == {**stored, b"blob": b"new"}  # version kept
    pending = store.keys.authorization_key("x" * 64)
    await store.redis.set(pending, b"before", px=60_000)
    assert await rekeyer._replace(authz, pending, b"before", b"after")
    assert await store.redis.get(pending) == b"after"
    assert 0 < await store.redis.pttl(pending) <= 60_000  # the expiry stays
    await store.redis.delete(pending)
    assert not await rekeyer._replace(authz, pending, b"after", b"again")
    assert await store.redis.get(pending) is None  # a taken authorization is not brought back


async def test_a_limited_run_resumes_and_a_rerun_is_idempotent(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str, log_file: Path
) -> None:
    replica = await mid_rotation(
        make_broker, redis_server.url, key_prefix, [grant(f"u-{i}") for i in range(30)]
    )
    store = store_of(replica)

    first = await run_rekey(replica.settings, limit=10)
    assert first.status == 1
    assert "stopped at --limit" in first.err
    assert await key_ids(store.redis, store.keys) == {"knew": 10, "kold": 20}
    second = await run_rekey(replica.settings)
    assert second.status == 0, second.err
    assert _row(second.out, "rewritten") == 20
    assert _row(second.out, "already current") == 10
    third = await run_rekey(replica.settings)
    assert third.status == 0
    assert (_row(third.out, "rewritten"), _row(third.out, "already current")) == (0, 30)
    for i in range(30):
        assert (await replica.token(f"u-{i}"))[1]["access_token"] == f"at-u-{i}"
    audit = [e for e in _events(log_file) if e["event"] == "rekey.finish"][-3:]
    assert [e["logger"] for e in audit] == ["broker.audit"] * 3
    assert [(e["outcome"], e["rewritten"], e["remaining"]) for e in audit] == [
        ("incomplete", 10, 20),
        ("complete", 20, 0),
        ("complete", 0, 0),
    ]
    assert {e["primary_key_id"] for e in audit} == {"knew"}


def _events(log_file: Path) -> list[dict[str, Any]]:
    with log_file.open(encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.startswith("{")]


def _row(summary: str, name: str) -> int:
    for line in summary.splitlines():
        if line.strip().startswith(name + ":"):
            return int(line.split()[-1])
    raise AssertionError(f"no {name!r} in the summary:\n{summary}")


async def test_dry_run_writes_nothing_and_says_what_remains(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    replica = await mid_rotation(
        make_broker, redis_server.url, key_prefix, [grant(f"u-{i}") for i in range(5)]
    )
    await replica.import_grant("fresh", refresh_token="rt", access_token="at", expires_in=600)
    redis = store_of(replica).redis
    snapshot = await _dump(redis, key_prefix)

    run = await run_rekey(replica.settings, dry_run=True)
    assert run.status == 1
    assert _row(run.out, "would be rewritten") == 5
    assert _row(run.out, "already current") == 1
    assert "5 record(s) are under another key than knew" in run.err
    assert await _dump(redis, key_prefix) == snapshot
    assert (await run_rekey(replica.settings)).status == 0
    done = await run_rekey(replica.settings, dry_run=True)
    assert done.status == 0
    assert _row(done.out, "would be rewritten") == 0


async def _dump(redis: Any, prefix: str) -> dict[bytes, Any]:
    """Every key's content by type (not DUMP: a hash's serialisation changes with Redis's
    incremental rehashing while its content does not)."""
    keys = sorted([k async for k in redis.scan_iter(match=f"{prefix}:*")])
    content: dict[bytes, Any] = {}
    for key in keys:
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            content[key] = sorted((await redis.hgetall(key)).items())
        elif kind == "string":
            content[key] = await redis.get(key)
        elif kind == "zset":
            content[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            content[key] = sorted(await redis.smembers(key))
        elif kind == "stream":
            content[key] = await redis.xrange(key)
        else:
            content[key] = await redis.dump(key)
    return content


async def test_progress_lines_off_a_terminal_a_bar_on_one_and_quiet(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    replica = await mid_rotation(
        make_broker, redis_server.url, key_prefix, [grant(f"u-{i}") for i in range(7)]
    )

    plain = await run_rekey(replica.settings, dry_run=True)
    lines = plain.err.splitlines()
    assert lines[-2].startswith("rekey: 7/7 records, 0 rewritten, 0 already current, ")
    assert lines[-2].endswith("/s, 0 s left")
    bar = await run_rekey(replica.settings, terminal=True)
    assert bar.status == 0
    assert "7/7" in bar.err
    assert "━" in bar.err  # rich's bar
    assert "rekey complete:" in bar.out
    quiet = await run_rekey(replica.settings, quiet=True)
    assert (quiet.status, quiet.out, quiet.err) == (0, "", "")


async def test_unreadable_records_fail_the_run_and_are_counted_never_shown(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    gone, old, new = new_key("kgone"), new_key("kold"), new_key("knew")
    common = {"redis_url": redis_server.url, "key_prefix": key_prefix}
    lost = await make_broker(encryption_keys=gone, **common)
    await seed(lost, [grant("lost-1"), grant("lost-2")])
    before = await make_broker(encryption_keys=old, **common)
    await seed(before, [grant("kept")])
    for gone_process in (lost, before):  # the old configurations are gone before the rekey
        await gone_process.client.close()
    replica = await make_broker(encryption_keys=f"{new},{old}", **common)
    store = store_of(replica)
    lost_blob = await store.redis.hget(store.keys.grant_key("dev", "lost-1"), "blob")
    assert isinstance(lost_blob, bytes)

    run = await run_rekey(replica.settings)
    assert run.status == 3
    assert _row(run.out, "unreadable") == 2
    assert _row(run.out, "rewritten") == 1
    assert "2 record(s) cannot be decrypted" in run.err
    assert "lost-1" not in run.out + run.err
    assert lost_blob.hex()[:16] not in run.out + run.err
    assert await key_ids(store.redis, store.keys) == {"knew": 1, "kgone": 2}


async def test_a_memory_store_or_a_throwaway_key_is_refused(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    run = await run_rekey(broker.settings)
    assert run.status == 2
    assert "memory://" in run.err


async def test_a_run_cut_off_from_redis_says_so(
    make_broker: BrokerFactory, own_redis: RedisServer, key_prefix: str
) -> None:
    common = {"redis_url": own_redis.url, "key_prefix": key_prefix, "redis_timeout": 0.5}
    replica = await make_broker(**common)
    own_redis.stop()
    cut = await run_rekey(replica.settings)
    assert cut.status == 1
    assert "Redis failed (ConnectionError); run `broker rekey` again: it resumes" in cut.err


async def test_app_tokens_are_rekeyed_and_served_under_the_new_key_alone(
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    old, new = new_key("kold"), new_key("knew")
    common = {
        "redis_url": redis_server.url,
        "key_prefix": key_prefix,
        "provider": {"client_credentials": True},
    }
    before = await make_broker(encryption_keys=old, **common)
    tokens = {}
    for scope in ("read", "read write"):
        status, body, _ = await before.call("GET", f"/v1/app-tokens/dev?scope={quote(scope)}")
        assert status == 200, body
        tokens[scope] = body["access_token"]
    await before.client.close()  # the old configuration is gone before the rekey
    replica = await make_broker(encryption_keys=f"{new},{old}", **common)
    store = store_of(replica)
    assert await key_ids(store.redis, store.keys) == {"kold": 2}

    result = await run_rekey(replica.settings)
    assert result.status == 0, result.err
    assert await key_ids(store.redis, store.keys) == {"knew": 2}
    after = await make_broker(encryption_keys=new, **common)
    requests = provider.client_credentials_requests
    for scope, token in tokens.items():
        status, body, _ = await after.call("GET", f"/v1/app-tokens/dev?scope={quote(scope)}")
        assert (status, body["access_token"]) == (200, token)
    assert provider.client_credentials_requests == requests  # served from the rekeyed records


async def test_each_serving_process_names_its_key_until_it_stops(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    """What `broker rekey` checks first: every serving process keeps an entry naming the key
    it encrypts with, expiring unless renewed, removed when it stops."""
    old, new = new_key("kold"), new_key("knew")
    common = {"redis_url": redis_server.url, "key_prefix": key_prefix}
    behind = await make_broker(encryption_keys=old, **common)
    rotated = await make_broker(encryption_keys=f"{new},{old}", **common)
    store = store_of(rotated)

    async def listed() -> bool:
        return sorted((await encrypting(store.redis, store.keys)).values()) == ["knew", "kold"]

    await eventually(listed, "both processes in the roster", within=5)
    for process in await encrypting(store.redis, store.keys):
        assert 0 < await store.redis.ttl(store.keys.encrypting_key(process)) <= ROSTER_TTL
    dry = await run_rekey(rotated.settings, dry_run=True)  # only warns
    assert "(kold)" in dry.err
    assert dry.status == 0, dry.err  # nothing stored under another key
    await behind.client.close()
    assert list((await encrypting(store.redis, store.keys)).values()) == ["knew"]
    assert (await run_rekey(rotated.settings)).status == 0
