"""Grant events: recorded in the events stream with the change that caused them, delivered to a
real HTTP receiver on loopback (failing, timing out, recovering), signed as the Standard
Webhooks reference implementation verifies, and never holding a token."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from standardwebhooks import Webhook

from broker.api import STORE
from broker.devprovider import DevProvider
from broker.errors import ConfigError
from broker.settings_webhooks import EVENT_TYPES
from broker.webhooks import delivery
from broker.webhooks.expiring import EVENT, ExpiryWatch
from tests.conftest import (
    SECRETS,
    Broker,
    BrokerFactory,
    Landing,
    RedisServer,
    broker_settings,
    connect,
    eventually,
    free_port,
    path,
)
from tests.faults import TcpProxy
from tests.fleet import start_fleet, stop_fleet

OLDEST = "broker_webhook_oldest_undelivered_seconds"
TIMEOUT = 1.0  # the receivers' delivery timeout in these tests: retries after 2, 4, 8 s


def new_secret() -> str:
    material = base64.b64encode(os.urandom(24)).decode()
    SECRETS.add(material)
    return f"whsec_{material}"


@dataclass
class Attempt:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """A webhook receiver on loopback: each attempt gets the next planned answer ("ok",
    "fail": 500, "hang": no answer within the broker's timeout), then "ok" for ever."""

    url: str = ""
    plan: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(Attempt(dict(request.headers), await request.read()))
        self.arrived.set()
        answer = self.plan.pop(0) if self.plan else "ok"
        if answer == "hang":
            await asyncio.sleep(60)
        return web.Response(status=500 if answer == "fail" else 204)

    def delivered(self, event_type: str) -> list[Attempt]:
        return [a for a in self.attempts if a.event["type"] == event_type]


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def make(*plan: str) -> Receiver:
        receiver = Receiver(plan=list(plan))
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        receiver.url = f"http://127.0.0.1:{port}/hook"
        runners.append(runner)
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()


def hook(receiver: Receiver, secret: str, **extra: Any) -> dict[str, Any]:
    return {"url": receiver.url, "secret": secret, "timeout": TIMEOUT, **extra}


async def stream_events(broker: Broker) -> list[dict[str, Any]]:
    store = broker.app[STORE]
    entries: Any = await store.redis.xrange(store.keys.events_key())
    return [json.loads(fields[b"body"]) for _, fields in entries]


def verify(secret: str, attempt: Attempt) -> dict[str, Any]:
    """The reference implementation's check (signature and timestamp)."""
    verified: dict[str, Any] = Webhook(secret).verify(attempt.body, attempt.headers)
    return verified


def assert_no_token(body: bytes, *tokens: str) -> None:
    text = body.decode()
    for token in tokens:
        assert token not in text
    assert 'token"' not in text  # no access_token / refresh_token field at all


async def test_a_state_change_is_in_the_stream_when_its_call_returns(
    broker: Broker, provider: DevProvider
) -> None:
    rt = provider.issue_refresh_token("ann")
    status, _ = await broker.import_grant("ann", refresh_token=rt, access_token="at-ann")
    assert status == 201
    [connected] = await stream_events(broker)
    assert connected["type"] == "grant.connected"
    assert connected["data"] == {
        "provider": "dev",
        "user_id": "ann",
        "state": "active",
        "last_error": None,
    }
    assert (await broker.token("ann"))[0] == 200
    status, _, _ = await broker.call("DELETE", path("grants", "ann"))
    assert status == 204
    events = await stream_events(broker)
    assert [e["type"] for e in events] == ["grant.connected", "grant.deleted"]
    assert events[1]["data"]["user_id"] == "ann"
    for event in events:
        assert_no_token(json.dumps(event).encode(), rt, "at-ann")


async def test_refreshes_that_change_nothing_record_nothing(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant("bo", refresh_token=provider.issue_refresh_token("bo"))
    for _ in range(3):
        broker.clock.advance(3600)
        assert (await broker.token("bo"))[0] == 200
    assert [e["type"] for e in await stream_events(broker)] == ["grant.connected"]


async def test_failing_then_recovered_and_reauth_required_are_recorded(
    broker: Broker, provider: DevProvider
) -> None:
    await broker.import_grant("cy", refresh_token=provider.issue_refresh_token("cy"))
    broker.clock.advance(3600)  # the access token expired
    provider.fail_always("server_error")
    assert (await broker.token("cy"))[0] == 503
    provider.heal()
    broker.clock.advance(120)
    assert (await broker.token("cy"))[0] == 200
    await broker.import_grant("dee", refresh_token="rt-unknown", access_token="at", expires_in=5)
    assert (await broker.token("dee"))[0] == 409
    recorded = await stream_events(broker)
    events = [(e["type"], e["data"]["user_id"], e["data"]["state"]) for e in recorded]
    assert events == [
        ("grant.connected", "cy", "active"),
        ("grant.refresh_failing", "cy", "refresh_failing"),
        ("grant.recovered", "cy", "active"),
        ("grant.connected", "dee", "active"),
        ("grant.reauth_required", "dee", "reauth_required"),
    ]
    assert recorded[1]["data"]["last_error"] == "http_500"


async def test_delivery_is_signed_retried_with_one_id_and_arrives(
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
    provider: DevProvider,
    receivers: Callable[..., Any],
) -> None:
    """A receiver that fails (500), then times out, then answers: the event arrives, every
    attempt with the same webhook-id and a valid signature; a second receiver that is down
    for the whole test does not delay the first."""
    flaky: Receiver = await receivers("fail", "hang")
    down: Receiver = await receivers(*["fail"] * 50)
    flaky_secret, down_secret = new_secret(), new_secret()
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        webhooks=[
            hook(flaky, flaky_secret, name="flaky"),
            hook(down, down_secret, name="down"),
        ],
    )
    await asyncio.sleep(0.2)  # the consumer groups exist (created at start, from the end)
    rt = provider.issue_refresh_token("eve")
    await broker.import_grant("eve", refresh_token=rt)
    await eventually(
        lambda: _true(len(flaky.attempts) >= 3), "three attempts at the flaky receiver", 15
    )
    assert len(down.attempts) >= 2  # retried meanwhile, never delivered
    ids = {a.headers["webhook-id"] for a in flaky.attempts}
    assert len(ids) == 1
    for attempt in flaky.attempts:
        verified = verify(flaky_secret, attempt)
        assert verified["type"] == "grant.connected"
        assert verified["data"]["user_id"] == "eve"
        assert_no_token(attempt.body, rt)
    verify(down_secret, down.attempts[0])
    with pytest.raises(Exception, match="signature"):
        verify(down_secret, flaky.attempts[0])  # each receiver has its own secret

    metrics = (await (await broker.client.get("/metrics")).text()).splitlines()
    assert 'broker_webhook_deliveries_total{outcome="success",webhook="flaky"} 1.0' in metrics
    assert 'broker_webhook_deliveries_total{outcome="refused",webhook="flaky"} 1.0' in metrics
    assert 'broker_webhook_deliveries_total{outcome="error",webhook="flaky"} 1.0' in metrics

    async def down_is_waiting() -> bool:
        text = await (await broker.client.get("/metrics")).text()
        ages = [line for line in text.splitlines() if line.startswith(OLDEST + '{webhook="down"}')]
        return bool(ages) and float(ages[0].split()[-1]) > 0

    await eventually(down_is_waiting, "the down receiver's backlog age", 10)


async def test_filters_and_a_revoked_refresh_token_is_reported(
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
    provider: DevProvider,
    receivers: Callable[..., Any],
) -> None:
    """The user revoked the broker's access at the provider: the next refresh is refused and
    ``grant.reauth_required`` is delivered, and only the events the receiver asked for."""
    receiver: Receiver = await receivers()
    secret = new_secret()
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        webhooks=[hook(receiver, secret, events=["grant.reauth_required"])],
    )
    await asyncio.sleep(0.2)
    rt = provider.issue_refresh_token("fay")
    await broker.import_grant("fay", refresh_token=rt, access_token="at-fay", expires_in=5)
    async with aiohttp.ClientSession() as http:
        pair = f"{provider.settings.client_id}:{provider.settings.client_secret}".encode()
        auth = {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        async with http.post(provider.revocation_url, data={"token": rt}, headers=auth) as answer:
            assert answer.status == 200
    assert (await broker.token("fay"))[0] == 409
    await eventually(lambda: _true(bool(receiver.attempts)), "the reauth event", 10)
    [attempt] = receiver.attempts
    event = verify(secret, attempt)
    assert event["type"] == "grant.reauth_required"
    assert event["data"]["state"] == "reauth_required"
    assert event["data"]["last_error"] == "invalid_grant"
    assert_no_token(attempt.body, rt, "at-fay")


async def test_memory_store_delivers_too(
    make_broker: BrokerFactory, provider: DevProvider, receivers: Callable[..., Any]
) -> None:
    receiver: Receiver = await receivers()
    secret = new_secret()
    broker = await make_broker(webhooks=[hook(receiver, secret)])
    await asyncio.sleep(0.2)
    await broker.import_grant("gil", refresh_token=provider.issue_refresh_token("gil"))
    await eventually(lambda: _true(bool(receiver.attempts)), "the connected event", 10)
    assert verify(secret, receiver.attempts[0])["type"] == "grant.connected"


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    ("table", "setting"),
    [
        ({"secret": "not-whsec"}, "webhooks[0].secret"),
        ({"secret": "whsec_c2hvcnQ=", "name": "app"}, "webhooks.app.secret"),
        ({"secret_env": "NO_SUCH_VARIABLE_SET"}, "webhooks.example-com.secret_env"),
        ({}, "webhooks[0].secret_env"),
        ({"secret": "whsec_" + "A" * 32, "events": ["grant.nope"]}, "webhooks[0].events"),
        ({"secret": "whsec_" + "A" * 32, "providers": ["nope"]}, "webhooks.example-com.providers"),
    ],
)
def test_bad_webhook_settings_name_the_setting(
    provider: DevProvider, table: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        broker_settings(
            provider,
            api_key_hash="0" * 64,
            webhooks=[{"url": "https://example.com/hook", **table}],
        )
    assert caught.value.setting == setting


def test_every_event_type_is_documented() -> None:
    with open("docs/webhooks.md", encoding="utf-8") as doc:
        text = doc.read()
    for event_type in EVENT_TYPES:
        assert f"`{event_type}`" in text


async def test_a_replica_killed_during_delivery_leaves_the_event_to_another(
    provider: DevProvider,
    own_redis: RedisServer,
    tmp_path: Path,
    receivers: Callable[..., Any],
) -> None:
    """Two broker processes; the one whose delivery hangs at the receiver is SIGKILLed: the
    other claims the event after its backoff and delivers it, under the same webhook-id."""
    receiver: Receiver = await receivers("hang")
    secret = new_secret()
    table = f'[[webhooks]]\nurl = "{receiver.url}"\nsecret = "{secret}"\ntimeout = 2\n'
    fleet = await start_fleet(provider, [own_redis.url] * 2, tmp_path, {}, extra_toml=table)
    try:
        async with aiohttp.ClientSession(headers=fleet.headers) as http:
            body = {"refresh_token": provider.issue_refresh_token("ivy"), "access_token": "at"}
            url = fleet.replicas[0].url + path("grants", "ivy")
            await eventually(lambda: _groups_ready(own_redis), "both replicas reading", 10)
            async with http.put(url, json=body) as answer:
                assert answer.status == 201
        await asyncio.wait_for(receiver.arrived.wait(), 10)
        redis = aioredis.Redis.from_url(own_redis.url)
        pending: Any = await redis.xpending_range("fleet:events", "webhook:127-0-0-1", "-", "+", 9)
        await redis.aclose()
        holder = int(pending[0]["consumer"].decode().split("-")[-2])
        [victim] = [r for r in fleet.replicas if r.process.pid == holder]
        victim.process.send_signal(signal.SIGKILL)
        await victim.process.wait()
        victim.alive = False
        await eventually(lambda: _true(len(receiver.attempts) >= 2), "a second attempt", 15)
        first, second = receiver.attempts[:2]
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert verify(secret, second)["data"]["user_id"] == "ivy"
    finally:
        await stop_fleet(fleet)


async def _groups_ready(server: RedisServer, key: str = "fleet:events") -> bool:
    redis = aioredis.Redis.from_url(server.url)
    try:
        groups = await redis.xinfo_groups(key)
    except aioredis.ResponseError:
        return False
    finally:
        await redis.aclose()
    return bool(groups)


async def test_a_refresh_token_near_its_maximum_age_is_reported_once(
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
    provider: DevProvider,
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        refresh_token_warn_before=7200,
        provider={"refresh_token_max_age": 3600},
    )
    rt = provider.issue_refresh_token("jo")
    await broker.import_grant("jo", refresh_token=rt)  # validated: its lifetime starts now
    await broker.import_grant("kim", refresh_token=provider.issue_refresh_token("kim"))
    store = broker.app[STORE]
    replicas = [ExpiryWatch(store, ["dev"], 7200, broker.clock) for _ in range(2)]
    assert sum([await watch.check() for watch in replicas]) == 2  # one per grant, not replica
    assert await replicas[0].check() == 0
    expiring = [e for e in await stream_events(broker) if e["type"] == EVENT]
    assert sorted(e["data"]["user_id"] for e in expiring) == ["jo", "kim"]
    assert expiring[0]["data"]["refresh_token_expires_at"]
    assert_no_token(json.dumps(expiring).encode(), rt)


def test_a_secret_file_is_read_and_checked(provider: DevProvider, tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    secret = new_secret()
    good.write_text(secret + "\n")
    bad.write_text("whsec_!!\n")

    def load(file: Path) -> Any:
        return broker_settings(
            provider,
            api_key_hash="0" * 64,
            webhooks=[{"url": "https://example.com/hook", "secret_file": str(file)}],
        )

    [loaded] = load(good).webhooks
    assert loaded.secret is not None
    assert loaded.secret.reveal() == secret
    assert secret not in repr(loaded)
    with pytest.raises(ConfigError) as caught:
        load(bad)
    assert caught.value.setting == "webhooks.example-com.secret_file"
    assert "whsec_!!" not in str(caught.value)


async def test_a_user_connecting_and_reconnecting_is_recorded_each_time(
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    """The authorization flow creates a grant, and replaces it when the user connects again
    (its state unchanged): both are ``grant.connected``."""
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        port=free_port(),
        redirect_allowlist=[landing.url + "/"],
    )
    for _ in range(2):
        journey = await connect(broker, browser, "lee", landing.url + "/")
        assert journey.query["status"] == "connected"
    events = await stream_events(broker)
    assert [(e["type"], e["data"]["state"]) for e in events] == [("grant.connected", "active")] * 2


async def test_an_event_older_than_a_day_is_given_up_not_delivered(
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
    provider: DevProvider,
    receivers: Callable[..., Any],
) -> None:
    receiver: Receiver = await receivers()
    broker = await make_broker(
        redis_url=redis_server.url,
        key_prefix=key_prefix,
        webhooks=[hook(receiver, new_secret(), name="late")],
    )
    store = broker.app[STORE]
    await eventually(lambda: _groups_ready(redis_server, store.keys.events_key()), "group", 10)
    body = '{"type":"grant.deleted","timestamp":"1970-01-01T00:00:01.000Z","data":{}}'
    await store.redis.xadd(
        store.keys.events_key(),
        {"type": "grant.deleted", "provider": "dev", "body": body},
        id="1000-1",  # dated 1970
    )
    await broker.import_grant("max", refresh_token=provider.issue_refresh_token("max"))
    await eventually(lambda: _true(bool(receiver.attempts)), "the new event", 10)
    assert [a.event["type"] for a in receiver.attempts] == ["grant.connected"]
    metrics = (await (await broker.client.get("/metrics")).text()).splitlines()
    assert 'broker_webhook_deliveries_total{outcome="expired",webhook="late"} 1.0' in metrics


async def test_a_write_whose_reply_was_lost_records_its_event_once(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    """redis-py sends the grant's script again when its reply is lost: the second run
    recognises the write and appends nothing, so the event is in the stream exactly once."""
    async with await TcpProxy.start("127.0.0.1", redis_server.port) as proxy:
        broker = await make_broker(redis_url=proxy.url_for_redis(), key_prefix=key_prefix)
        store = broker.app[STORE]
        proxy.drop_reply_once(store._fenced_write.sha.encode())
        status, _ = await broker.import_grant("nia", refresh_token="rt", access_token="at")
        assert status == 201
        assert proxy.dropped_replies == 1
        proxy.drop_reply_once(store._delete.sha.encode())
        # 404 when the lost reply was the delete's own: the retry finds the grant gone
        assert (await broker.call("DELETE", path("grants", "nia")))[0] in (204, 404)
        assert proxy.dropped_replies == 2
        assert (await broker.grant("nia"))[0] == 404
        assert [e["type"] for e in await stream_events(broker)] == [
            "grant.connected",
            "grant.deleted",
        ]


async def test_deliveries_resume_after_redis_was_cut_off(
    make_broker: BrokerFactory,
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
    receivers: Callable[..., Any],
) -> None:
    """Redis unreachable while an event waits for its retry: the loop survives, and once Redis
    is back the event is delivered, under the same webhook-id."""
    receiver: Receiver = await receivers("fail")
    secret = new_secret()
    async with await TcpProxy.start("127.0.0.1", redis_server.port) as proxy:
        broker = await make_broker(
            redis_url=proxy.url_for_redis(),
            key_prefix=key_prefix,
            redis_timeout=0.5,
            webhooks=[hook(receiver, secret)],
        )
        await eventually(
            lambda: _groups_ready(redis_server, broker.app[STORE].keys.events_key()), "group", 10
        )
        await broker.import_grant("oli", refresh_token="rt", access_token="at")
        await asyncio.wait_for(receiver.arrived.wait(), 10)  # refused: to be retried in 2 s
        proxy.blackhole()

        async def loop_failed_twice() -> bool:
            text = await (await broker.client.get("/metrics")).text()
            line = 'broker_redis_errors_total{operation="webhook"} '
            counts = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
            return bool(counts) and counts[0] >= 2

        # two turns failed: past the retry's due time (2 s), with Redis gone
        await eventually(loop_failed_twice, "the loop meeting the outage", 15)
        assert len(receiver.attempts) == 1
        proxy.heal()
        await eventually(lambda: _true(len(receiver.attempts) >= 2), "the retry", 15)
        first, second = receiver.attempts[:2]
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert verify(secret, second)["data"]["user_id"] == "oli"


async def consumers(broker: Broker) -> dict[str, int]:
    """Each consumer of the stream's one group and its pending entries."""
    store = broker.app[STORE]
    [group] = await store.redis.xinfo_groups(store.keys.events_key())
    listed = await store.redis.xinfo_consumers(store.keys.events_key(), group["name"])
    return {_name(c["name"]): int(c["pending"]) for c in listed}


def _name(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_consumers_of_processes_gone_are_forgotten_once_they_hold_nothing(
    make_broker: BrokerFactory,
    provider: DevProvider,
    receivers: Callable[..., Any],
    store_url: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every process is a consumer of its own, so every restart leaves one behind: those not
    seen for a while are deleted, but never one still holding an undelivered entry."""
    monkeypatch.setattr(delivery, "CONSUMER_GONE_AFTER", 1.0)
    monkeypatch.setattr(delivery, "GAUGE_INTERVAL", 0.2)
    monkeypatch.setattr(delivery, "retry_after", lambda attempts, timeout: 3600.0)  # kept held
    receiver: Receiver = await receivers()
    broker = await make_broker(webhooks=[hook(receiver, new_secret())], **store_url)
    await broker.import_grant("u", refresh_token=provider.issue_refresh_token("u"))
    await eventually(lambda: _true(bool(receiver.attempts)), "the connected event", 10)
    store = broker.app[STORE]
    stream = store.keys.events_key()
    [group] = await store.redis.xinfo_groups(stream)
    await store.redis.xadd(stream, {"type": "test.held", "provider": "dev", "body": b"{}"})
    # a process gone holding an entry it never delivered, and one gone with nothing
    await store.redis.xreadgroup(group["name"], "gone-holding", {stream: ">"}, count=1)
    await store.redis.xreadgroup(group["name"], "gone-empty", {stream: ">"}, count=1)
    assert (await consumers(broker))["gone-holding"] == 1

    async def forgotten() -> bool:
        return "gone-empty" not in await consumers(broker)

    await eventually(forgotten, "the empty consumer forgotten", within=10)
    left = await consumers(broker)
    assert left["gone-holding"] == 1  # its entry goes to another consumer by the usual claim
    assert len(left) == 2  # and this process's own consumer


async def test_the_stream_keeps_about_events_max_len_entries(
    make_broker: BrokerFactory, provider: DevProvider, store_url: dict[str, str]
) -> None:
    broker = await make_broker(events_max_len=1000, **store_url)
    for i in range(1500):
        status, _ = await broker.import_grant(f"u-{i}", refresh_token=f"rt-{i}", access_token="at")
        assert status == 201
    store = broker.app[STORE]
    kept = await store.redis.xlen(store.keys.events_key())
    # MAXLEN ~ trims whole nodes of the stream (100 entries by default): never below the bound
    assert 1000 <= kept < 1200, kept
    newest: Any = await store.redis.xrevrange(store.keys.events_key(), count=1)
    assert json.loads(newest[0][1][b"body"])["data"]["user_id"] == "u-1499"
