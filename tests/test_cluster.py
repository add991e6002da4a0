"""A real three-node Redis Cluster on loopback: grants, locks, scripts and a sharded schedule.

Every key of one grant shares a hash tag, every script names keys of one slot, and with
``schedule_shards`` one provider's schedule spreads over keys on several nodes.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as syncredis
from redis.crc import key_slot

from broker.api import STORE
from broker.devprovider import DevProvider
from broker.keys import member
from tests.conftest import FAST_SCHEDULER as FAST
from tests.conftest import (
    BrokerFactory,
    RedisServer,
    eventually,
    free_port,
    metric,
    path,
    throwaway_redis,
)

USERS = 30
SHARDS = 8


def node_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free and valid too."""
    for _ in range(100):
        port = free_port()
        if port <= 55535:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port pair free for a cluster node")


def cluster_ok(port: int) -> bool:
    try:
        info = syncredis.Redis(port=port).execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    except syncredis.RedisError:
        return False
    return b"cluster_state:ok" in info


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    """The seed URL of a started three-master cluster (no replicas)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("no redis-cli on this machine: install redis-server")
    nodes: list[RedisServer] = []
    try:
        for i in range(3):
            workdir = tmp_path / f"node-{i}"
            workdir.mkdir()
            nodes.append(
                throwaway_redis(
                    workdir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "{workdir}/nodes.conf",
                    port=node_port(),
                )
            )
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        for node in nodes:
            for _ in range(200):
                if cluster_ok(node.port):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("the cluster did not come up")
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    finally:
        for node in nodes:
            node.stop()


async def test_grants_refresh_and_revoke_on_a_cluster(
    cluster: str, make_broker: BrokerFactory, provider: DevProvider
) -> None:
    provider.settings.access_token_ttl = 2
    broker = await make_broker(
        redis_url=cluster,
        schedule_shards=SHARDS,
        reconcile_interval=0.05,
        provider={"refresh_token_max_age": 7 * 86400},
        **FAST,
    )
    for i in range(USERS):
        status, _ = await broker.import_grant(
            f"u-{i}", refresh_token=provider.issue_refresh_token(f"u-{i}")
        )
        assert status == 201

    async def refreshed_twice() -> bool:
        counts = [(await broker.grant(f"u-{i}"))[1]["refresh_count"] for i in range(USERS)]
        return all(count >= 3 for count in counts)  # the import's, then the scheduler's

    await eventually(refreshed_twice, "background refreshes on the cluster", within=20)
    for i in range(USERS):
        status, _ = await broker.token(f"u-{i}", min_ttl=0)
        assert status == 200
    assert provider.reused_refresh_tokens == 0

    store = broker.app[STORE]
    # A lost index update of a grant nothing else writes: the reconciler (grant by grant on a
    # cluster, whose slots a script cannot span) puts it back on the schedule and out of the
    # wrong state set.
    status, _ = await broker.import_grant(
        "idle",
        refresh_token=provider.issue_refresh_token("idle"),
        access_token="at-idle",
        expires_in=3600,
    )
    assert status == 201
    lost = member("idle")
    await store.redis.zrem(store.keys.schedule_of("dev", lost), lost)
    await store.redis.sadd(store.keys.state_key("dev", "reauth_required"), lost)
    await store.redis.zrem(store.keys.rt_expiry_key("dev"), lost)

    async def repaired() -> bool:
        scheduled = await store.redis.zscore(store.keys.schedule_of("dev", lost), lost)
        wrong = await store.redis.sismember(store.keys.state_key("dev", "reauth_required"), lost)
        expiring = await store.redis.zscore(store.keys.rt_expiry_key("dev"), lost)
        return scheduled is not None and not wrong and expiring is not None

    await eventually(repaired, "the reconciler to put the grant back", within=10)
    for index in ("schedule", "reauth_required", "refresh_token_expiry"):
        assert metric(broker, "broker_index_repairs_total", provider="dev", index=index) >= 1
    slots = {key_slot(store.keys.schedule_key("dev", shard).encode()) for shard in range(SHARDS)}
    assert len(slots) > 1  # the schedule is not one hot slot
    status, _, headers = await broker.call("DELETE", path("grants", "u-0"))
    assert status == 204
    assert headers["Broker-Revocation"] == "revoked"
    assert (await broker.grant("u-0"))[0] == 404
    # events (docs/webhooks.md): the stream is in another slot, appended after each script
    entries: Any = await store.redis.xrange(store.keys.events_key())
    types = [fields[b"type"] for _, fields in entries]
    assert types == [b"grant.connected"] * (USERS + 1) + [b"grant.deleted"]


async def test_grant_listing_covers_every_primary_of_a_cluster(
    cluster: str, make_broker: BrokerFactory
) -> None:
    from tests.test_grant_listing import grant, list_all, seed

    broker = await make_broker(redis_url=cluster)
    users = [f"listed-{i}" for i in range(300)]
    await seed(
        broker,
        [grant(u, "reauth_required" if i % 3 == 0 else "active") for i, u in enumerate(users)],
    )
    store = broker.app[STORE]
    slots = {key_slot(store.keys.grant_key("dev", u).encode()) for u in users}
    assert len(slots) > 100  # spread over every node
    listed, pages = await list_all(broker, limit=40)
    assert sorted(set(listed)) == sorted(users)
    assert pages >= 8
    reauth, _ = await list_all(broker, "&state=reauth_required", limit=40)
    assert sorted(set(reauth)) == sorted(users[0::3])
    active, _ = await list_all(broker, "&state=active", limit=40)
    assert sorted(set(active)) == sorted(u for i, u in enumerate(users) if i % 3)
