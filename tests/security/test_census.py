"""``broker_records_by_key{key_id}``: the rolling census, its publication, and what rekey does
to it."""

from __future__ import annotations

import base64

from broker.api import KEYRING, STORE
from broker.census import KeyCensus, publish
from broker.crypto import KeyRing
from broker.metrics import Metrics
from tests.conftest import Broker, BrokerFactory, RedisServer, eventually
from tests.security.rekeying import mid_rotation, new_key, run_rekey
from tests.test_grant_listing import grant, record, seed


async def scraped(broker: Broker) -> dict[str, float]:
    """``broker_records_by_key`` as ``GET /metrics`` shows it."""
    async with broker.client.get("/metrics") as response:
        text = await response.text()
    figures = {}
    for line in text.splitlines():
        if line.startswith("broker_records_by_key{"):
            labels, value = line.rsplit(" ", 1)
            figures[labels.split('key_id="', 1)[1].rstrip('"}')] = float(value)
    return figures


async def test_the_census_counts_records_per_key_and_rekey_updates_it_at_once(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    replica = await mid_rotation(
        make_broker,
        redis_server.url,
        key_prefix,
        [grant(f"u-{i}") for i in range(4)],
        key_census_interval=0.05,
    )
    await replica.import_grant("fresh", refresh_token="rt", access_token="at", expires_in=600)
    store = replica.app[STORE]
    forged = KeyRing([("kforged", base64.b64decode(new_key("kforged").split(":", 1)[1]))])
    await store.redis.hset(
        store.keys.grant_key("dev", "forged"),
        mapping=record(forged, grant("forged")),  # type: ignore[arg-type]
    )

    async def counted() -> bool:
        return await scraped(replica) == {"kold": 4, "knew": 1, "(unknown)": 1}

    await eventually(counted, "the census of records per key", within=20)
    await store.redis.delete(store.keys.grant_key("dev", "forged"))
    run = await run_rekey(replica.settings)
    assert run.status == 0, run.err

    async def rekeyed() -> bool:
        return await scraped(replica) == {"knew": 5}

    await eventually(rekeyed, "the figures rekey published", within=5)


async def test_a_pass_is_bounded_steps_and_an_older_count_never_replaces_a_newer(
    make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    await seed(broker, [grant(f"u-{i}") for i in range(60)])
    store = broker.app[STORE]
    metrics = Metrics()
    census = KeyCensus(store.redis, store.keys, broker.app[KEYRING], metrics, store.guard, batch=5)
    steps = 1
    while not await census.step():
        steps += 1
        assert steps < 10_000
        if steps == 2:  # nothing is published before a pass is complete
            assert not await store.redis.exists(store.keys.census_key())
    assert steps >= 3
    assert metrics.registry.get_sample_value("broker_records_by_key", {"key_id": "k1"}) == 60

    assert not await publish(store.redis, store.keys, {"k1": 1}, started=1.0)  # older: refused
    await census.show()
    assert metrics.registry.get_sample_value("broker_records_by_key", {"key_id": "k1"}) == 60


async def test_the_census_runs_on_the_embedded_store_and_on_redis(
    make_broker: BrokerFactory, store_url: dict[str, str]
) -> None:
    broker = await make_broker(key_census_interval=0.05, **store_url)
    for user in ("a", "b"):
        await broker.import_grant(user, refresh_token="rt", access_token="at", expires_in=600)

    async def counted() -> bool:
        return await scraped(broker) == {"k1": 2}

    await eventually(counted, "the census on this store", within=20)
