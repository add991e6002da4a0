"""Records under a key id that is not configured, or in a format version this broker does not
know: ``500 grant_unreadable``, a security log event naming the grant and key id (never the
ciphertext), a metric, and no crash."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from broker.api import KEYRING, METRICS, STORE
from broker.crypto import KeyRing
from tests.conftest import Broker, BrokerFactory, RedisServer, path
from tests.security.rekeying import new_key
from tests.test_grant_listing import grant, record


def security_events(log_file: Path, offset: int) -> list[dict[str, Any]]:
    with log_file.open(encoding="utf-8") as stream:
        stream.seek(offset)
        lines = [json.loads(line) for line in stream if line.startswith("{")]
    return [e for e in lines if e.get("logger") == "broker.security"]


def unreadable_count(broker: Broker) -> float:
    value = broker.app[METRICS].registry.get_sample_value(
        "broker_grants_unreadable_total", {"provider": "dev"}
    )
    return value or 0.0


@pytest.mark.parametrize("damage", ["unknown_key", "unknown_version"])
async def test_an_unknown_key_id_or_format_version_is_grant_unreadable(
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
    log_file: Path,
    damage: str,
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, encryption_keys=new_key("kcur")
    )
    store = broker.app[STORE]
    foreign = KeyRing([("kgone", base64.b64decode(new_key("kgone").split(":", 1)[1]))])
    if damage == "unknown_key":
        fields = record(foreign, grant("u"))
    else:  # the broker's own key, in a format version 2 it does not know
        fields = record(broker.app[KEYRING], grant("u"))
        fields["blob"] = bytes([2]) + fields["blob"][1:]
    blob: bytes = fields["blob"]
    await store.redis.hset(store.keys.grant_key("dev", "u"), mapping=fields)  # type: ignore[arg-type]
    offset = log_file.stat().st_size
    before = unreadable_count(broker)

    for kind in ("tokens", "grants"):
        async with broker.client.get(path(kind, "u"), headers=broker.headers) as response:
            text = await response.text()
            assert response.status == 500
            assert response.content_type == "application/problem+json"
        assert json.loads(text)["code"] == "grant_unreadable"
        assert base64.b64encode(blob[-24:]).decode() not in text
    assert unreadable_count(broker) == before + 2

    events = [e for e in security_events(log_file, offset) if e["event"] == "record.unreadable"]
    assert len(events) == 2
    event = events[0]
    assert (event["provider"], event["user_id"], event["kind"]) == ("dev", "u", "grant")
    if damage == "unknown_key":
        assert event["key_id"] == "kgone"
        assert "'kgone', which is not configured" in event["reason"]
    else:
        assert event["key_id"] == "(unknown format)"
        assert event["reason"] == "record has format version 2, which is not known"
    line = json.dumps(events)
    assert blob.hex()[-32:] not in line
    assert base64.b64encode(blob[-24:]).decode() not in line

    # the broker keeps serving: other grants, and the unreadable one can be replaced
    status, _ = await broker.import_grant("v", refresh_token="rt", access_token="at")
    assert status == 201
    assert (await broker.token("v"))[0] == 200
    status, _ = await broker.import_grant("u", refresh_token="rt2", access_token="at2")
    assert status == 200
    assert (await broker.token("u"))[1]["access_token"] == "at2"
