"""``broker rekey`` on a Redis Cluster (every primary scanned), behind Sentinel (with replica
acknowledgement), and as a real process killed mid-way and run again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis as syncredis
import redis.asyncio as aioredis

from broker.api import KEYRING, STORE
from broker.census import KeyCensus
from broker.crypto import KeyRing, record_key_id
from broker.devprovider import DevProvider
from broker.keys import Keys
from broker.metrics import Metrics
from broker.settings_secrets import parse_encryption_keys
from tests.conftest import (
    BrokerFactory,
    Landing,
    RedisServer,
    start_authorization,
)
from tests.security.rekeying import key_ids, new_key, run_rekey
from tests.test_cluster import cluster  # noqa: F401  (the fixture)
from tests.test_grant_listing import grant, record, seed
from tests.test_sentinel import SentinelSetup, sentinel_setup  # noqa: F401  (the fixture)


async def test_rekey_and_the_census_cover_every_primary_of_a_cluster(
    cluster: str,  # noqa: F811
    make_broker: BrokerFactory,
    landing: Landing,
) -> None:
    old, new = new_key("kold"), new_key("knew")
    allow = {"redirect_allowlist": [landing.url + "/"]}
    before = await make_broker(redis_url=cluster, encryption_keys=old, **allow)
    await seed(
        before, [grant(f"u-{i}", "reauth_required" if i % 5 else "active") for i in range(90)]
    )
    for i in range(3):
        assert (await start_authorization(before, f"p-{i}", landing.url + "/x"))[0] == 201
    await before.client.close()  # the old configuration is gone before the rekey
    replica = await make_broker(redis_url=cluster, encryption_keys=f"{new},{old}", **allow)
    store = replica.app[STORE]
    assert await key_ids(store.redis, store.keys) == {"kold": 93}

    run = await run_rekey(replica.settings)
    assert run.status == 0, run.err
    assert await key_ids(store.redis, store.keys) == {"knew": 93}
    census = KeyCensus(store.redis, store.keys, replica.app[KEYRING], Metrics(), store.guard)
    while not await census.step():
        pass
    figures = census._metrics.registry.get_sample_value("broker_records_by_key", {"key_id": "knew"})
    assert figures == 93
    only_new = await make_broker(redis_url=cluster, encryption_keys=new, **allow)
    for i in range(0, 90, 7):
        assert (await only_new.grant(f"u-{i}"))[0] == 200


async def test_rekey_behind_sentinel_waits_for_the_replica(
    sentinel_setup: SentinelSetup,  # noqa: F811
    make_broker: BrokerFactory,
    key_prefix: str,
) -> None:
    old, new = new_key("kold"), new_key("knew")
    common = {"redis_url": sentinel_setup.url, "key_prefix": key_prefix}
    before = await make_broker(encryption_keys=old, **common)
    await seed(before, [grant(f"u-{i}") for i in range(20)])
    await before.client.close()  # the old configuration is gone before the rekey
    replica = await make_broker(
        encryption_keys=f"{new},{old}", min_replicas_to_ack=1, replica_ack_timeout=1.0, **common
    )
    run = await run_rekey(replica.settings)  # min_replicas_to_ack = 1: each swap WAITs
    assert run.status == 0, run.err
    assert "rewritten:" in run.out
    store = replica.app[STORE]
    assert await key_ids(store.redis, store.keys) == {"knew": 20}
    assert (await replica.token("u-3"))[1]["access_token"] == "at-u-3"
    copy = syncredis.Redis(port=sentinel_setup.replica.port)  # WAIT: the replica has them
    blobs = [copy.hget(store.keys.grant_key("dev", f"u-{i}"), "blob") for i in range(20)]
    assert {record_key_id(b) for b in blobs if isinstance(b, bytes)} == {"knew"}
    assert len(blobs) == 20


CONFIG = """
redis_url = "{redis_url}"
key_prefix = "{key_prefix}"

[providers.dev]
token_url = "{token_url}"
client_id = "broker"
client_secret = "not-used-here"
"""


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
async def test_a_killed_run_leaves_every_record_readable_and_a_rerun_finishes(
    stop: signal.Signals,
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    old, new = new_key("kold"), new_key("knew")
    common = {"redis_url": redis_server.url, "key_prefix": key_prefix}
    before = await make_broker(encryption_keys=old, **common)
    users = [f"u-{i}" for i in range(3000)]
    for start in range(0, len(users), 500):
        await seed(before, [grant(u) for u in users[start : start + 500]])
    await before.client.close()  # the old configuration is gone before the rekey
    config = tmp_path / "broker.toml"
    config.write_text(CONFIG.format(token_url=provider.token_url, **common), encoding="utf-8")
    env = {**os.environ, "BROKER_ENCRYPTION_KEYS": f"{new},{old}"}
    command = [sys.executable, "-m", "broker", "rekey", "--config", str(config)]

    first = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert first.stderr is not None
    async with asyncio.timeout(60):
        while not (await first.stderr.readline()).startswith(b"rekey: "):
            pass  # JSON log lines, until the first progress line
    first.send_signal(stop)
    summary, rest = await first.communicate()
    if stop == signal.SIGINT:  # Ctrl-C: stops after the batch in hand, says what was done
        assert first.returncode == 130, rest
        assert summary.startswith(b"rekey interrupted:")
        assert b"run `broker rekey` again: it resumes" in rest

    keyring = KeyRing(parse_encryption_keys(f"{new},{old}"))
    redis, keys = aioredis.Redis.from_url(redis_server.url), Keys(key_prefix)
    try:
        blobs = await _all_blobs(redis, keys, users)
        assert all(isinstance(b, bytes) and keyring.decrypt(b, _aad(u)) for u, b in blobs.items())
        counts = await key_ids(redis, keys)
        assert sum(counts.values()) == 3000

        second = await asyncio.create_subprocess_exec(
            *command, "--quiet", env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await second.communicate()
        assert second.returncode == 0, out
        assert await key_ids(redis, keys) == {"knew": 3000}
    finally:
        await redis.aclose()


def _aad(user_id: str) -> bytes:
    from broker.crypto import grant_aad

    return grant_aad("dev", user_id)


async def _all_blobs(redis: object, keys: Keys, users: list[str]) -> dict[str, object]:
    pipe = redis.pipeline(transaction=False)  # type: ignore[attr-defined]
    for user in users:
        pipe.hget(keys.grant_key("dev", user), "blob")
    return dict(zip(users, await pipe.execute(), strict=True))


def test_the_command_line_options(
    provider: DevProvider, redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    old, new = new_key("kold"), new_key("knew")
    keyring = KeyRing(parse_encryption_keys(old))
    client = syncredis.Redis.from_url(redis_server.url)
    keys = Keys(key_prefix)
    for i in range(5):
        fields = record(keyring, grant(f"u-{i}"))
        client.hset(keys.grant_key("dev", f"u-{i}"), mapping=fields)  # type: ignore[arg-type]
    client.close()
    config = tmp_path / "broker.toml"
    config.write_text(
        CONFIG.format(
            token_url=provider.token_url, redis_url=redis_server.url, key_prefix=key_prefix
        ),
        encoding="utf-8",
    )
    env = {**os.environ, "BROKER_ENCRYPTION_KEYS": f"{new},{old}"}

    def rekey(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "rekey", "--config", str(config), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    dry = rekey("--dry-run")
    assert dry.returncode == 1
    assert "rekey dry_run (dry run: nothing written):" in dry.stdout
    assert "5 record(s) are under another key than knew" in dry.stderr
    limited = rekey("--limit", "2", "--quiet")
    assert (limited.returncode, limited.stdout) == (1, "")
    assert "stopped at --limit" in limited.stderr
    assert rekey("--limit", "0").returncode == 2  # refused by the option parser
    done = rekey()
    assert done.returncode == 0, done.stderr
    assert "every record is under key knew" in done.stdout
