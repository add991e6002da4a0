"""A Sentinel-managed Redis: a failover loses no grant whose write the replica acknowledged.

One primary, one replica and one sentinel on loopback, all Debian's redis-server. Imports
validate (and so rotate) refresh tokens at the provider, and with ``min_replicas_to_ack = 1``
each write waits until the replica holds it. Then the primary is killed with SIGKILL.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as syncredis

from broker.api import METRICS
from broker.devprovider import DevProvider
from tests.conftest import BrokerFactory, RedisServer, free_port, throwaway_redis
from tests.test_scheduler import eventually

USERS = 20


@dataclass
class SentinelSetup:
    primary: RedisServer
    replica: RedisServer
    url: str


def wait_until(check: object, what: str) -> None:
    for _ in range(200):
        try:
            if check():  # type: ignore[operator]
                return
        except syncredis.RedisError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on this machine: install redis-server")
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    servers: list[RedisServer] = []
    sentinel: subprocess.Popen[bytes] | None = None
    try:
        primary = throwaway_redis(tmp_path / "primary")
        servers.append(primary)
        replica = throwaway_redis(
            tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port)
        )
        servers.append(replica)
        replica_client = syncredis.Redis(port=replica.port)
        wait_until(
            lambda: replica_client.info("replication")["master_link_status"] == "up",
            "the replica to sync",
        )
        sentinel_port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor mymaster 127.0.0.1 {primary.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 3000\n"
        )
        sentinel = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        sentinel_client = syncredis.Redis(port=sentinel_port)
        wait_until(
            lambda: sentinel_client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "replicas", "mymaster"
            ),
            "the sentinel to see the replica",
        )
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0"
        yield SentinelSetup(primary, replica, url)
    finally:
        if sentinel is not None:
            sentinel.kill()
            sentinel.wait(timeout=10)
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.stop()


async def test_failover_loses_no_acknowledged_grant(
    make_broker: BrokerFactory, provider: DevProvider, sentinel_setup: SentinelSetup
) -> None:
    broker = await make_broker(
        redis_url=sentinel_setup.url,
        min_replicas_to_ack=1,
        replica_ack_timeout=0.3,
        redis_timeout=0.5,
    )
    for i in range(USERS):
        status, _ = await broker.import_grant(
            f"u-{i}", refresh_token=provider.issue_refresh_token(f"u-{i}")
        )
        assert status == 201
    registry = broker.app[METRICS].registry
    assert (registry.get_sample_value("broker_replication_unconfirmed_total") or 0) == 0

    sentinel_setup.primary.stop()  # SIGKILL: the sentinel promotes the replica

    async def all_readable() -> bool:
        statuses = [(await broker.grant(f"u-{i}"))[0] for i in range(USERS)]
        return all(status == 200 for status in statuses)

    await eventually(all_readable, "every grant to be readable on the new primary", within=20)
    broker.clock.advance(3600)
    for i in range(USERS):  # the rotated refresh tokens survived: refreshing works
        status, _ = await broker.token(f"u-{i}")
        assert status == 200
    assert provider.reused_refresh_tokens == 0
