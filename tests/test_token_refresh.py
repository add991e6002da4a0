"""`POST /v1/tokens/{provider}/{user_id}/refresh`: a token a resource server refused is replaced
by one refresh however many callers report it, in one process or across replicas, and a stale
report refreshes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from broker.api import REFRESHER
from broker.devprovider import DevProvider
from broker.models import MAX_TOKEN_CHARS
from tests.clients import api_key, bearer, client
from tests.conftest import Broker, BrokerFactory, RedisServer, path
from tests.test_concurrency import in_flight, replicas, until

__all__ = ["replicas"]  # the fixture, shared with test_concurrency


async def report(
    broker: Broker, user_id: str, rejected: str, **kwargs: Any
) -> tuple[int, Any, Any]:
    """Report ``rejected`` as refused by a resource server: (status, body, headers)."""
    return await broker.call(
        "POST", path("tokens", user_id) + "/refresh", json={"rejected_token": rejected}, **kwargs
    )


async def connected(broker: Broker, provider: DevProvider, user_id: str) -> str:
    """A grant of ``user_id`` with a live access token from the provider; its token, with
    the provider's counters reset."""
    status, _ = await broker.import_grant(user_id, refresh_token=provider.issue_refresh_token())
    assert status == 201
    status, token = await broker.token(user_id)
    assert status == 200
    provider.reset_counters()
    access_token: str = token["access_token"]
    return access_token


async def test_the_rejected_current_token_is_replaced_by_one_refresh(
    broker: Broker, provider: DevProvider
) -> None:
    rejected = await connected(broker, provider, "u")
    status, body, headers = await report(broker, "u", rejected)
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert body["access_token"] != rejected
    assert provider.access_token_expires_at(body["access_token"]) is not None
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] > 30
    assert provider.refresh_requests == 1
    assert (await broker.token("u"))[1]["access_token"] == body["access_token"]
    assert provider.refresh_requests == 1
    assert provider.reused_refresh_tokens == 0


async def test_a_stale_rejected_token_refreshes_nothing_and_gets_the_current_one(
    broker: Broker, provider: DevProvider
) -> None:
    first = await connected(broker, provider, "u")
    _, current, _ = await report(broker, "u", first)
    for stale in (first, "at-never-issued", first + "x", first[:-1]):
        status, body, _ = await report(broker, "u", stale)
        assert (status, body["access_token"]) == (200, current["access_token"])
    assert provider.refresh_requests == 1
    assert provider.reused_refresh_tokens == 0


async def test_a_user_id_with_slashes_reports_its_own_grant(
    broker: Broker, provider: DevProvider
) -> None:
    rejected = await connected(broker, provider, "team/a b/..")
    other = await connected(broker, provider, "team")
    status, body, _ = await report(broker, "team/a b/..", rejected)
    assert status == 200
    assert body["access_token"] != rejected
    assert (await broker.token("team"))[1]["access_token"] == other
    assert provider.refresh_requests == 1


async def test_twenty_concurrent_reporters_in_one_process_cause_one_refresh(
    make_broker: BrokerFactory, provider: DevProvider, redis_server: RedisServer, key_prefix: str
) -> None:
    broker = await make_broker(redis_url=redis_server.url, key_prefix=key_prefix)
    rejected = await connected(broker, provider, "u")
    provider.hold()
    calls = [asyncio.create_task(report(broker, "u", rejected)) for _ in range(20)]
    await provider.wait_for_token_requests(1)
    await until(lambda: in_flight(broker) == 20, "all 20 reporters to be waiting")
    provider.release()
    results = await asyncio.gather(*calls)
    assert {status for status, _, _ in results} == {200}
    tokens = {body["access_token"] for _, body, _ in results}
    assert len(tokens) == 1
    assert rejected not in tokens
    assert provider.access_token_expires_at(tokens.pop()) is not None
    assert provider.refresh_requests == 1
    assert provider.reused_refresh_tokens == 0


async def test_reporters_on_two_replicas_cause_one_refresh_and_share_its_token(
    replicas: tuple[Broker, Broker], provider: DevProvider
) -> None:
    a, b = replicas
    rejected = await connected(a, provider, "u")
    provider.hold()
    calls = [asyncio.create_task(report(r, "u", rejected)) for r in (a, b) for _ in range(10)]
    await provider.wait_for_token_requests(1)
    await until(lambda: in_flight(a) == 10 and in_flight(b) == 10, "both replicas waiting")
    # Both replicas refresh: one is at the provider, the other waits for the grant's lock.
    await until(lambda: all(r.app[REFRESHER].in_flight("dev", "u") for r in (a, b)), "two flights")
    provider.release()
    results = await asyncio.gather(*calls)
    assert {status for status, _, _ in results} == {200}
    tokens = {body["access_token"] for _, body, _ in results}
    assert len(tokens) == 1
    assert rejected not in tokens
    assert provider.access_token_expires_at(tokens.pop()) is not None
    assert provider.refresh_requests == 1
    # Neither replica lost the rotated refresh token: both can refresh again, in turn.
    for replica in (b, a):
        replica.clock.advance(3600)
        assert (await replica.token("u"))[0] == 200
    assert provider.refresh_requests == 3
    assert provider.reused_refresh_tokens == 0


async def test_a_report_on_another_replica_after_the_refresh_refreshes_nothing(
    replicas: tuple[Broker, Broker], provider: DevProvider
) -> None:
    a, b = replicas
    rejected = await connected(a, provider, "u")
    status, first, _ = await report(a, "u", rejected)
    assert status == 200
    status, second, _ = await report(b, "u", rejected)
    assert (status, second["access_token"]) == (200, first["access_token"])
    assert provider.refresh_requests == 1
    assert provider.reused_refresh_tokens == 0


async def test_a_rejected_token_the_provider_cannot_replace_now_is_not_handed_back(
    broker: Broker, provider: DevProvider
) -> None:
    rejected = await connected(broker, provider, "u")
    provider.fail_next("garbage")
    status, body, headers = await report(broker, "u", rejected)
    assert (status, body["code"]) == (503, "upstream_unavailable")
    assert int(headers["Retry-After"]) >= 1
    status, body, _ = await report(broker, "u", rejected)  # the provider answers again
    assert status == 200
    assert body["access_token"] != rejected
    assert provider.refresh_requests == 2
    assert provider.reused_refresh_tokens == 0


async def test_a_refresh_token_the_provider_rejects_is_reauth_required(
    broker: Broker, provider: DevProvider
) -> None:
    rejected = await connected(broker, provider, "u")
    provider.fail_next("invalid_grant")
    status, body, _ = await report(broker, "u", rejected)
    assert (status, body["code"]) == (409, "reauth_required")
    status, body, _ = await report(broker, "u", rejected)
    assert (status, body["code"]) == (409, "reauth_required")
    assert provider.refresh_requests == 1
    assert provider.reused_refresh_tokens == 0


async def test_unknown_grant_and_provider_are_404(broker: Broker, provider: DevProvider) -> None:
    status, body, _ = await report(broker, "nobody", "at-x")
    assert (status, body["code"]) == (404, "grant_not_found")
    status, body, _ = await broker.call(
        "POST", path("tokens", "u", provider="nope") + "/refresh", json={"rejected_token": "x"}
    )
    assert (status, body["code"]) == (404, "provider_not_found")
    assert provider.token_requests == 0


async def test_reporting_needs_tokens_read_for_that_provider(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    keys = {name: api_key() for name in ("reader", "elsewhere", "owner")}

    dev = {
        "token_url": provider.token_url,
        "client_id": provider.settings.client_id,
        "client_secret": provider.settings.client_secret,
    }
    broker = await make_broker(
        providers={"dev": dev, "other": dev},
        clients=[
            client("reader", keys["reader"], permissions=["grants:read", "grants:write"]),
            client(
                "elsewhere", keys["elsewhere"], permissions=["tokens:read"], providers=["other"]
            ),
            client(
                "owner",
                keys["owner"],
                permissions=["tokens:read", "grants:write"],
                providers=["dev"],
            ),
        ],
    )
    broker.api_key = keys["owner"]
    rejected = await connected(broker, provider, "u")
    for name in ("reader", "elsewhere"):
        status, body, _ = await report(broker, "u", rejected, headers=bearer(keys[name]))
        assert (status, body["code"]) == (403, "forbidden"), name
    status, body, answer = await report(broker, "u", rejected, headers={"Authorization": ""})
    assert (status, body["code"]) == (401, "unauthenticated")
    assert answer["WWW-Authenticate"].startswith("Bearer")
    assert provider.refresh_requests == 0
    status, _, _ = await report(broker, "u", rejected)
    assert status == 200
    assert provider.refresh_requests == 1


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "rejected_token is required: a non-empty string"),
        ({"rejected_token": ""}, "rejected_token is required: a non-empty string"),
        ({"rejected_token": None}, "rejected_token is required: a non-empty string"),
        ({"rejected_token": 12}, "rejected_token is required: a non-empty string"),
        ({"rejected_token": ["at"]}, "rejected_token is required: a non-empty string"),
        (
            {"rejected_token": "a" * (MAX_TOKEN_CHARS + 1)},
            "rejected_token is required: a non-empty string",
        ),
        ({"rejected_token": "at", "min_ttl": 60}, "unknown field(s): min_ttl"),
        ([], "the body must be a JSON object"),
        ("at", "the body must be a JSON object"),
    ],
)
async def test_bad_bodies_are_400(
    broker: Broker, provider: DevProvider, body: Any, detail: str
) -> None:
    await connected(broker, provider, "u")
    status, answer, _ = await broker.call("POST", path("tokens", "u") + "/refresh", json=body)
    assert (status, answer["code"], answer["detail"]) == (400, "invalid_request", detail)
    assert provider.token_requests == 0


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"", "application/json"), (b"{", "application/json"), (b"rejected_token=x", "text/plain")],
)
async def test_bodies_that_are_not_json_are_400(
    broker: Broker, provider: DevProvider, data: bytes, content_type: str
) -> None:
    await connected(broker, provider, "u")
    status, answer, _ = await broker.call(
        "POST",
        path("tokens", "u") + "/refresh",
        data=data,
        headers={"Content-Type": content_type},
    )
    assert (status, answer["code"]) == (400, "invalid_request")
    assert provider.token_requests == 0


async def test_reports_and_handouts_are_logged_without_the_token(
    broker: Broker, provider: DevProvider, log_file: Path
) -> None:
    rejected = await connected(broker, provider, "u")
    before = log_file.stat().st_size
    status, body, _ = await report(broker, "u", rejected)
    assert status == 200
    with log_file.open(encoding="utf-8") as stream:
        stream.seek(before)
        lines = stream.read()
    assert '"event": "refresh.reported"' in lines
    assert '"event": "token.handout"' in lines
    assert rejected not in lines
    assert body["access_token"] not in lines
