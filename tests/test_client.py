"""broker.client against a real ``broker serve`` process (real Redis, the dev provider on
loopback), and against small loopback stubs where the broker cannot be made to answer so
(rate limits, outages, app tokens whose server side is elsewhere)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from broker.client import (
    AppTokenNotConfigured,
    BrokerClient,
    BrokerError,
    BrokerUnreachable,
    Forbidden,
    GrantNotFound,
    GrantUnreadable,
    HttpxAuth,
    InvalidRequest,
    ProviderNotFound,
    RateLimited,
    ReauthRequired,
    RetryPolicy,
    StoreUnavailable,
    Token,
    Unauthenticated,
    UnexpectedAnswer,
    aiohttp_middleware,
)
from broker.client.retry import parse_retry_after
from broker.devprovider import DevProvider
from tests.conftest import SECRETS, RedisServer, free_port, path
from tests.fleet import Fleet, start_fleet, stop_fleet
from tests.resource_server import ResourceServer, client_auth, resource_server

TOKENS = "/v1/tokens/{provider}/{user_id}"
REPORTS = "/v1/tokens/{provider}/{user_id}/refresh"
NO_RETRY = RetryPolicy(attempts=1)


@dataclass
class RealBroker:
    url: str
    api_key: str
    fleet: Fleet
    provider: DevProvider

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(headers=self.fleet.headers) as http,
            http.request(method, URL(self.url + url, encoded=True), **kwargs) as response,
        ):
            return response.status, await response.json(content_type=None)

    async def connect(self, user_id: str, **body: Any) -> None:
        """A grant for ``user_id`` (validated by a refresh unless ``access_token`` is given)."""
        refresh_token = body.pop("refresh_token", None) or self.provider.issue_refresh_token()
        status, answer = await self.call(
            "PUT", path("grants", user_id), json={"refresh_token": refresh_token, **body}
        )
        assert status == 201, answer

    async def served(self, route: str, method: str = "GET") -> int:
        """Requests this broker served on ``route`` (any status), from its /metrics."""
        async with aiohttp.ClientSession() as http, http.get(self.url + "/metrics") as response:
            text = await response.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("broker_http_requests_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                if labels.get("route") == route and labels.get("method") == method:
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def client(self, **options: Any) -> BrokerClient:
        return BrokerClient(self.url, self.api_key, **options)


@pytest.fixture
async def real_broker(
    provider: DevProvider, redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> AsyncIterator[RealBroker]:
    fleet = await start_fleet(
        provider,
        [redis_server.url],
        tmp_path,
        {"key_prefix": key_prefix},
        provider_settings={"client_credentials": True},  # app tokens too
    )
    api_key = fleet.headers["Authorization"].removeprefix("Bearer ")
    try:
        yield RealBroker(fleet.replicas[0].url, api_key, fleet, provider)
    finally:
        await stop_fleet(fleet)
    log = fleet.replicas[0].log.read_text(encoding="utf-8", errors="replace")
    leaked = [s for s in (*provider.secrets(), api_key) if len(s) >= 8 and s in log]
    assert not leaked, f"{len(leaked)} secret(s) in the broker's log"


async def revoke_at_provider(provider: DevProvider, token: str) -> None:
    """What a user or an admin does at the provider: the token stops working at once."""
    async with (
        aiohttp.ClientSession(headers=client_auth(provider)) as http,
        http.post(provider.revocation_url, data={"token": token}) as response,
    ):
        assert response.status == 200


# -- caching and single flight, against the real broker ----------------------------------------


async def test_a_cached_token_is_served_without_asking_the_broker(real_broker: RealBroker) -> None:
    await real_broker.connect("u-1")
    async with real_broker.client() as client:
        first = await client.token("dev", "u-1", min_ttl=30)
        again = [await client.token("dev", "u-1", min_ttl=600) for _ in range(5)]
    assert all(token == first for token in again)
    assert await real_broker.served(TOKENS) == 1
    assert first.token_type == "Bearer"
    assert first.expires_at is not None
    assert first.expires_at.tzinfo is not None
    assert first.expires_in is not None
    assert 3500 < first.expires_in <= 3600
    assert first.scope == "public_api"


async def test_concurrent_callers_share_one_fetch(real_broker: RealBroker) -> None:
    await real_broker.connect("u-1")
    async with real_broker.client() as client:
        tokens = await asyncio.gather(*(client.token("dev", "u-1") for _ in range(20)))
    assert len({t.access_token for t in tokens}) == 1
    assert await real_broker.served(TOKENS) == 1


async def test_a_min_ttl_beyond_the_cached_tokens_life_fetches_again(
    real_broker: RealBroker,
) -> None:
    await real_broker.connect("u-1", access_token="imported-" + "a" * 20, expires_in=600)
    SECRETS.add("imported-" + "a" * 20)
    async with real_broker.client() as client:
        imported = await client.token("dev", "u-1", min_ttl=30)
        assert await client.token("dev", "u-1", min_ttl=500) == imported  # 600 s left: enough
        assert await real_broker.served(TOKENS) == 1
        fresher = await client.token("dev", "u-1", min_ttl=900)  # the broker refreshes first
        assert await real_broker.served(TOKENS) == 2
        assert fresher.access_token != imported.access_token
        assert await client.token("dev", "u-1", min_ttl=900) == fresher
    assert await real_broker.served(TOKENS) == 2
    assert real_broker.provider.refresh_requests == 1


async def test_user_ids_with_reserved_characters_reach_their_own_grant(
    real_broker: RealBroker,
) -> None:
    odd = ["a/b c", "..", "x/../y", "é@{*}:ü", "%2F"]
    for user_id in odd:
        await real_broker.connect(user_id)
    async with real_broker.client() as client:
        tokens = [await client.token("dev", user_id) for user_id in odd]
        with pytest.raises(GrantNotFound):
            await client.token("dev", "a")
    assert len({t.access_token for t in tokens}) == len(odd)


# -- problems as exceptions ---------------------------------------------------------------------


async def test_problem_codes_of_the_real_broker_are_typed_exceptions(
    real_broker: RealBroker,
) -> None:
    async with real_broker.client(retry=NO_RETRY) as client:
        with pytest.raises(GrantNotFound) as missing:
            await client.token("dev", "nobody")
        with pytest.raises(Forbidden):  # this client may use provider "dev" only
            await client.token("nowhere", "u-1")
        with pytest.raises(InvalidRequest):
            await client.token("dev", "u-1", min_ttl=99999)
    async with BrokerClient(real_broker.url, "brk_wrong_" + "x" * 30) as stranger:
        with pytest.raises(Unauthenticated) as unknown_key:
            await stranger.token("dev", "u-1")
    assert missing.value.status == 404
    assert missing.value.code == "grant_not_found"
    assert missing.value.request_id
    assert missing.value.request_id in str(missing.value)
    assert unknown_key.value.status == 401
    assert "brk_wrong" not in str(unknown_key.value)


async def test_a_refresh_token_revoked_at_the_provider_raises_reauth_required(
    real_broker: RealBroker,
) -> None:
    refresh_token = real_broker.provider.issue_refresh_token()
    access = "imported-" + "b" * 20
    SECRETS.add(access)
    await real_broker.connect(
        "u-1", refresh_token=refresh_token, access_token=access, expires_in=600
    )
    await revoke_at_provider(real_broker.provider, refresh_token)
    async with real_broker.client() as client:
        assert (await client.token("dev", "u-1")).access_token == access  # still valid
        with pytest.raises(ReauthRequired) as dead:
            await client.token("dev", "u-1", min_ttl=900)
    assert dead.value.status == 409
    assert access not in repr(dead.value)


# -- reporting a rejected token, and the auth helpers -------------------------------------------


async def test_a_reported_token_leaves_the_cache_and_its_replacement_is_cached(
    real_broker: RealBroker,
) -> None:
    await real_broker.connect("u-1")
    async with real_broker.client() as client:
        rejected = await client.token("dev", "u-1")
        replacements = await asyncio.gather(
            *(client.report_rejected("dev", "u-1", rejected) for _ in range(10))
        )
        assert await client.token("dev", "u-1") == replacements[0]
        late = await client.report_rejected("dev", "u-1", rejected.access_token)
    assert {t.access_token for t in replacements} == {late.access_token}
    assert late.access_token != rejected.access_token
    assert await real_broker.served(REPORTS, "POST") == 1
    assert await real_broker.served(TOKENS) == 1


HelperCall = Callable[[BrokerClient, str, bytes], Any]


async def via_aiohttp(client: BrokerClient, url: str, body: bytes) -> tuple[int, bytes]:
    middleware = aiohttp_middleware(client, "dev", "u-1")
    async with (
        aiohttp.ClientSession(middlewares=(middleware,)) as api,
        api.post(url, data=body) as response,
    ):
        return response.status, await response.read()


async def via_httpx(client: BrokerClient, url: str, body: bytes) -> tuple[int, bytes]:
    async with httpx.AsyncClient(auth=HttpxAuth(client, "dev", "u-1")) as api:
        response = await api.post(url, content=body)
        return response.status_code, response.content


HELPERS = pytest.mark.parametrize("send", [via_aiohttp, via_httpx], ids=["aiohttp", "httpx"])


@pytest.fixture
async def api(provider: DevProvider) -> AsyncIterator[ResourceServer]:
    async with resource_server(provider) as server:
        yield server


@HELPERS
async def test_the_helpers_send_the_users_token(
    real_broker: RealBroker, api: ResourceServer, send: HelperCall
) -> None:
    await real_broker.connect("u-1")
    async with real_broker.client() as client:
        status, body = await send(client, api.url, b"payload")
        current = await client.token("dev", "u-1")
    assert (status, body) == (200, b"payload")
    assert [seen.token for seen in api.seen] == [current.access_token]
    assert await real_broker.served(REPORTS, "POST") == 0


@HELPERS
async def test_a_token_revoked_early_is_reported_once_and_the_request_retried_once(
    real_broker: RealBroker, api: ResourceServer, send: HelperCall
) -> None:
    await real_broker.connect("u-1")
    async with real_broker.client() as client:
        revoked = await client.token("dev", "u-1")
        await revoke_at_provider(real_broker.provider, revoked.access_token)
        status, body = await send(client, api.url, b"payload")
        replacement = await client.token("dev", "u-1")
    assert (status, body) == (200, b"payload")
    assert [seen.token for seen in api.seen] == [revoked.access_token, replacement.access_token]
    assert [seen.body for seen in api.seen] == [b"payload", b"payload"]
    assert await real_broker.served(REPORTS, "POST") == 1
    assert real_broker.provider.refresh_requests == 2  # the import's validation, the report's


@HELPERS
async def test_many_requests_refused_with_one_revoked_token_make_one_report(
    real_broker: RealBroker, api: ResourceServer, send: HelperCall
) -> None:
    await real_broker.connect("u-1")
    async with real_broker.client() as client:
        revoked = await client.token("dev", "u-1")
        await revoke_at_provider(real_broker.provider, revoked.access_token)
        answers = await asyncio.gather(*(send(client, api.url, b"%d" % i) for i in range(8)))
    assert answers == [(200, b"%d" % i) for i in range(8)]
    assert sum(seen.token == revoked.access_token for seen in api.seen) == 8
    assert len(api.seen) == 16
    assert await real_broker.served(REPORTS, "POST") == 1


@HELPERS
async def test_a_resource_server_that_always_refuses_gets_one_retry(
    real_broker: RealBroker, api: ResourceServer, send: HelperCall
) -> None:
    await real_broker.connect("u-1")
    api.always_401 = True
    async with real_broker.client() as client:
        status, _ = await send(client, api.url, b"payload")
    assert status == 401
    assert len(api.seen) == 2
    assert api.seen[0].token != api.seen[1].token
    assert await real_broker.served(REPORTS, "POST") == 1


def test_the_httpx_helper_refuses_a_sync_client() -> None:
    auth = HttpxAuth(BrokerClient("http://127.0.0.1:1", "key"), "dev", "u-1")
    with httpx.Client(auth=auth) as api, pytest.raises(RuntimeError, match="AsyncClient"):
        api.get("http://127.0.0.1:1/")


async def test_app_tokens_of_a_real_broker_are_fetched_once_per_scope_set(
    real_broker: RealBroker, provider: DevProvider
) -> None:
    async with real_broker.client() as client:
        plain = await client.app_token("dev")
        again = await asyncio.gather(*(client.app_token("dev") for _ in range(5)))
        scoped = await client.app_token("dev", "b a")
        assert await client.app_token("dev", "a b") == scoped
    assert {t.access_token for t in again} == {plain.access_token}
    assert scoped.access_token != plain.access_token
    assert await real_broker.served("/v1/app-tokens/{provider}") == 2  # the rest came from cache
    assert provider.client_credentials_requests == 2


# -- retries and app tokens, against a stub answering per the contract -------------------------


Answer = tuple[
    int, Any, dict[str, str]
]  # status, JSON body (or a function of the request), headers


@dataclass
class Stub:
    """A broker stand-in: answers from ``script`` in order (then the last one, forever)."""

    script: list[Answer]
    url: str = ""
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # answers wait until it is set
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request came in
    arrivals: list[float] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)


def token_body(access_token: str, expires_in: int = 3600) -> dict[str, Any]:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expires_in))
    return {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_at": when,
        "expires_in": expires_in,
        "scope": "public_api",
    }


def problem(status: int, code: str, **headers: str) -> Answer:
    body = {"type": f"urn:broker:problem:{code}", "title": code, "status": status, "code": code}
    return status, {**body, "detail": f"stub says {code}", "request_id": "req-1"}, headers


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    fake = Stub([])
    fake.gate.set()

    async def answer(request: web.Request) -> web.Response:
        fake.arrivals.append(time.monotonic())
        fake.queries.append(dict(request.query))
        fake.arrived.set()
        await fake.gate.wait()
        status, body, headers = fake.script[min(len(fake.arrivals), len(fake.script)) - 1]
        if callable(body):
            body = body(request)
        ctype = "application/json" if status == 200 else "application/problem+json"
        return web.json_response(body, status=status, headers=headers, content_type=ctype)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app)
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()


async def test_a_caller_that_gives_up_does_not_cancel_the_fetch_others_wait_for(
    stub: Stub,
) -> None:
    stub.script = [(200, token_body("at-shared"), {})]
    stub.gate.clear()
    async with BrokerClient(stub.url, "key") as client:
        impatient = asyncio.create_task(client.token("dev", "u-1"))
        patient = asyncio.create_task(client.token("dev", "u-1"))
        await asyncio.wait_for(stub.arrived.wait(), 10)  # the shared request reached it
        impatient.cancel()
        stub.gate.set()
        assert (await patient).access_token == "at-shared"
        assert (await client.token("dev", "u-1")).access_token == "at-shared"
    assert impatient.cancelled()
    assert len(stub.arrivals) == 1


async def test_a_fetch_older_than_a_report_does_not_cache_the_rejected_token() -> None:
    released = asyncio.Event()

    async def get(request: web.Request) -> web.Response:
        await released.wait()  # answers after the report, with what broker held before it
        return web.json_response(token_body("at-old"))

    async def report(request: web.Request) -> web.Response:
        assert (await request.json()) == {"rejected_token": "at-old"}
        return web.json_response(token_body("at-new"))

    app = web.Application()
    app.router.add_get("/v1/tokens/dev/u-1", get)
    app.router.add_post("/v1/tokens/dev/u-1/refresh", report)
    server = TestServer(app)
    await server.start_server()
    try:
        async with BrokerClient(str(server.make_url("")), "key") as client:
            slow = asyncio.create_task(client.token("dev", "u-1"))
            await asyncio.sleep(0)  # its request is in the air
            assert (await client.report_rejected("dev", "u-1", "at-old")).access_token == "at-new"
            released.set()
            assert (await slow).access_token == "at-old"
            assert (await client.token("dev", "u-1")).access_token == "at-new"
    finally:
        await server.close()


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(formatdate(now + 42, usegmt=True), now) == 42.0
    assert parse_retry_after(formatdate(now - 42, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_a_503_with_retry_after_is_retried_after_that_wait(stub: Stub) -> None:
    stub.script = [problem(503, "upstream_unavailable", **{"Retry-After": "1"})]
    stub.script.append((200, token_body("at-after-outage"), {}))
    async with BrokerClient(stub.url, "key") as client:
        token = await client.token("dev", "u-1")
    assert token.access_token == "at-after-outage"
    assert len(stub.arrivals) == 2
    assert stub.arrivals[1] - stub.arrivals[0] >= 1.0


async def test_retries_stop_when_the_wait_budget_is_spent(stub: Stub) -> None:
    stub.script = [problem(503, "store_unavailable", **{"Retry-After": "1"})]
    async with BrokerClient(stub.url, "key", retry=RetryPolicy(attempts=9, max_wait=1.5)) as c:
        with pytest.raises(StoreUnavailable) as down:
            await c.token("dev", "u-1")
    assert len(stub.arrivals) == 2  # a second wait of 1 s would pass 1.5 s in all
    assert down.value.retry_after == 1.0
    assert down.value.status == 503


async def test_a_rate_limit_longer_than_the_budget_is_raised_at_once(stub: Stub) -> None:
    stub.script = [problem(429, "rate_limited", **{"Retry-After": "60"})]
    async with BrokerClient(stub.url, "key") as client:
        with pytest.raises(RateLimited) as limited:
            await client.token("dev", "u-1")
    assert len(stub.arrivals) == 1
    assert limited.value.retry_after == 60.0


async def test_retries_stop_after_the_attempts_allowed(stub: Stub) -> None:
    stub.script = [problem(429, "rate_limited", **{"Retry-After": "0"})]
    async with BrokerClient(stub.url, "key", retry=RetryPolicy(attempts=3)) as client:
        with pytest.raises(RateLimited):
            await client.token("dev", "u-1")
    assert len(stub.arrivals) == 3


async def test_final_problems_are_not_retried(stub: Stub) -> None:
    cases: list[tuple[Answer, type[BrokerError]]] = [
        (problem(404, "provider_not_found"), ProviderNotFound),
        (problem(500, "grant_unreadable"), GrantUnreadable),
        (problem(404, "app_token_not_configured"), AppTokenNotConfigured),
        (problem(418, "teapot_from_the_future"), UnexpectedAnswer),
        ((502, {"html": "bad gateway"}, {}), UnexpectedAnswer),
        ((200, {"no": "token"}, {}), UnexpectedAnswer),
    ]
    async with BrokerClient(stub.url, "key") as client:
        for answer, expected in cases:
            stub.script, stub.arrivals = [answer], []
            with pytest.raises(expected) as raised:
                await client.token("dev", f"u-{answer[0]}")
            assert type(raised.value) is expected
            assert len(stub.arrivals) == 1
    assert raised.value.status == 200


async def test_an_unreachable_broker_is_retried_then_raised() -> None:
    retry = RetryPolicy(attempts=3, backoff=0.01)
    async with BrokerClient(f"http://127.0.0.1:{free_port()}", "key", retry=retry) as client:
        with pytest.raises(BrokerUnreachable):
            await client.token("dev", "u-1")


async def test_app_tokens_are_cached_per_scope_set(stub: Stub) -> None:
    counter = iter(range(100))

    def fresh(request: web.Request) -> dict[str, Any]:
        assert request.path == "/v1/app-tokens/dev"
        return token_body(f"app-{next(counter)}")

    stub.script = [(200, fresh, {})]
    async with BrokerClient(stub.url, "key") as client:
        plain = await client.app_token("dev")
        assert await client.app_token("dev", min_ttl=120) == plain
        ab = await asyncio.gather(*(client.app_token("dev", "a b") for _ in range(5)))
        assert await client.app_token("dev", "b a  a") == ab[0]
    assert {t.access_token for t in ab} == {"app-1"}
    assert plain.access_token == "app-0"
    assert stub.queries == [{"min_ttl": "30"}, {"min_ttl": "30", "scope": "a b"}]


async def test_app_tokens_not_configured_raise(stub: Stub) -> None:
    stub.script = [problem(404, "app_token_not_configured")]
    async with BrokerClient(stub.url, "key") as client:
        with pytest.raises(AppTokenNotConfigured) as refused:
            await client.app_token("dev")
    assert refused.value.request_id == "req-1"


# -- hygiene --------------------------------------------------------------------------------------


def test_a_token_never_shows_its_secret() -> None:
    token = Token("at-very-secret-value", "bearer", None, None, None)
    assert "very-secret" not in repr(token)
    assert "very-secret" not in str(token)
    assert token.authorization == "Bearer at-very-secret-value"
    assert token.seconds_left() is None


def test_the_library_imports_none_of_the_servers_modules() -> None:
    probe = (
        "import sys, broker.client;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('broker', 'httpx', 'redis', 'structlog', 'pydantic', 'cryptography', 'prometheus_client')"
        " and not m.startswith('broker.client')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "['broker']"
