"""The benchmark's pieces (bench/), not the benchmark: it is run by hand, never in CI."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import redis as syncredis

from broker import grant_record
from broker.config import parse_encryption_keys
from broker.crypto import KeyRing, grant_aad, new_key
from broker.keys import Keys, member
from tests.conftest import RedisServer

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_seeding() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_seeding", BENCH / "seeding.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_seeded_grants_are_records_broker_reads_as_fresh(own_redis: RedisServer) -> None:
    seeding = bench_seeding()
    key = new_key()
    keyring = KeyRing(parse_encryption_keys(key))
    now = time.time()
    seeding.seed(own_redis.port, keyring, 3, now)
    client = syncredis.Redis(port=own_redis.port)
    keys = Keys()
    for i in range(3):
        user_id = f"user-{i}"
        version, blob = client.hmget(keys.grant_key("dev", user_id), ["v", "blob"])
        assert isinstance(blob, bytes)
        assert isinstance(version, bytes)
        grant = grant_record.decode(
            "dev", user_id, int(version), keyring.decrypt(blob, grant_aad("dev", user_id))
        )
        assert grant.valid_for(now) > 3600
        assert grant.access_token
        assert grant.refresh_token
        assert client.zscore(keys.schedule_key("dev"), member(user_id)) == grant.next_refresh_at
    assert client.zcard(keys.schedule_key("dev")) == 3
    client.close()


def test_the_wrk_script_prints_the_line_the_runner_parses() -> None:
    script = (BENCH / "tokens.lua").read_text(encoding="utf-8")
    assert 'BENCH {"requests"' in script
    for name in ("BENCH_PATH", "BENCH_USERS", "BENCH_API_KEY"):
        assert name in script
        assert name in (BENCH / "run.py").read_text(encoding="utf-8")
