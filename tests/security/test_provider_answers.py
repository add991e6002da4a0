"""Whatever a token endpoint answers, broker stays bounded and keeps the grant.

A real HTTP stub on loopback plays a provider that answers garbage: huge or endless bodies,
wrong types, truncated JSON, HTML error pages, wrong content types, empty bodies, a 200 that
carries an error. Each answer is classified (transient, or rejected only for a refusal the
provider configuration names), the error carries no secret even when the provider echoes one,
and a stored grant survives it unchanged, to be refreshed once the provider is sane again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.api import STORE
from broker.config import ProviderSettings, Secret
from broker.errors import ProviderError, ProviderRejected, ProviderUnavailable
from broker.oauth import MAX_EXPIRES_IN, OAuthClient
from tests.conftest import SECRETS, Broker, BrokerFactory, Clock, RedisServer

CLIENT_SECRET = "cs-stub-4f1d0c2a9b"
LIMIT = 64 * 1024
DEFAULT_EXPIRES_IN = 900
SECRETS.add(CLIENT_SECRET)

Answer = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def reply(
    status: int, body: bytes | str, content_type: str = "application/json", **headers: str
) -> Answer:
    """An answer with ``body``, in which ``{rt}`` becomes the refresh token presented and
    ``{cs}`` the client secret (a provider echoing them must not make broker leak them)."""

    async def answer(_: web.Request, refresh_token: str) -> web.StreamResponse:
        raw = body.encode() if isinstance(body, str) else body
        raw = raw.replace(b"{rt}", refresh_token.encode()).replace(b"{cs}", CLIENT_SECRET.encode())
        return web.Response(
            status=status, body=raw, headers={"Content-Type": content_type, **headers}
        )

    return answer


def tokens(**fields: object) -> Answer:
    return reply(200, json.dumps({"access_token": "at-new", "token_type": "Bearer", **fields}))


async def endless(request: web.Request, _refresh_token: str) -> web.StreamResponse:
    """A 200 that never ends (chunked, no Content-Length): only a cap while reading stops it."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"access_token": "')
    chunk = b"a" * 65536
    for _ in range(16 * 1024):  # 1 GiB at most, if the client never hung up
        await response.write(chunk)
    return response


@dataclass
class Stub:
    """The token endpoint; ``answer`` is what it says next, ``seen`` the refresh tokens."""

    url: str
    answer: Answer
    seen: list[str]


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    state = Stub("", tokens(expires_in=3600), [])

    async def token(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        refresh_token = str(form.get("refresh_token", ""))
        state.seen.append(refresh_token)
        return await state.answer(request, refresh_token)

    app = web.Application()
    app.router.add_post("/token", token)
    server = TestServer(app)
    await server.start_server()
    state.url = str(server.make_url("/token"))
    yield state
    await server.close()


@pytest.fixture
async def oauth() -> AsyncIterator[OAuthClient]:
    async with aiohttp.ClientSession() as session:
        yield OAuthClient(session, timeout=5, connect_timeout=2, max_response_bytes=LIMIT)


def provider_of(stub: Stub) -> ProviderSettings:
    return ProviderSettings(
        name="stub",
        token_url=stub.url,
        client_id="c",
        client_secret=Secret(CLIENT_SECRET),
        default_expires_in=DEFAULT_EXPIRES_IN,
    )


HTML = "<html><body><h1>Oops</h1><p>refresh_token={rt} client_secret={cs}</p></body></html>"
# id -> (answer, the reason of the transient failure)
GARBAGE: dict[str, tuple[Answer, str]] = {
    "huge body, declared length": (tokens(access_token="a" * (2 * LIMIT)), "response_too_large"),
    "endless chunked body": (endless, "response_too_large"),
    "truncated JSON": (reply(200, '{"access_token": "at-new", "token_ty'), "malformed_response"),
    "HTML page with 200": (reply(200, HTML, "text/html"), "malformed_response"),
    "HTML error page 502": (reply(502, HTML, "text/html"), "http_502"),
    "HTML page with 400": (reply(400, HTML, "text/html"), "http_400"),
    "empty 200": (reply(200, b""), "malformed_response"),
    "empty 400": (reply(400, b""), "http_400"),
    "form body labelled JSON": (
        reply(200, "access_token=at-new&token_type=bearer"),
        "malformed_response",
    ),
    "JSON array": (reply(200, '["at-new"]'), "malformed_response"),
    "deeply nested JSON": (reply(200, "[" * 50_000), "malformed_response"),
    "not UTF-8": (reply(200, b'{"access_token": "\xff\xfe\x00"'), "malformed_response"),
    "200 with an error object": (
        reply(200, '{"error": "invalid_grant", "error_description": "{rt}"}'),
        "malformed_response",
    ),
    "access_token a number": (tokens(access_token=12345), "malformed_response"),
    "access_token null": (tokens(access_token=None), "malformed_response"),
    "access_token an object": (tokens(access_token={"v": "{rt}"}), "malformed_response"),
    "refresh_token a list": (tokens(refresh_token=["rt-2"]), "malformed_response"),
    "token_type an object": (tokens(token_type={"t": 1}), "malformed_response"),
    "error a list": (reply(400, '{"error": ["invalid_grant"]}'), "http_400"),
    "error too long": (reply(400, json.dumps({"error": "x" * 200})), "unrecognized_error"),
    "error echoing the secret": (reply(401, '{"error": "{cs}"}'), "unrecognized_error"),
    "5xx JSON": (reply(503, '{"error": "temporarily_unavailable"}'), "http_503"),
    "429 with a NaN Retry-After": (
        reply(429, "slow down", "text/plain", **{"Retry-After": "nan"}),
        "rate_limited",
    ),
}


def assert_no_secret(err: BaseException, refresh_token: str) -> None:
    for text in (str(err), repr(err), repr(err.args)):
        assert refresh_token not in text
        assert CLIENT_SECRET not in text


@pytest.mark.parametrize("case", GARBAGE, ids=list(GARBAGE))
async def test_garbage_is_a_transient_failure_without_secrets(
    case: str, stub: Stub, oauth: OAuthClient
) -> None:
    stub.answer, reason = GARBAGE[case]
    with pytest.raises(ProviderError) as caught:
        await oauth.refresh(provider_of(stub), "rt-presented-7c41")
    assert isinstance(caught.value, ProviderUnavailable), caught.value
    assert caught.value.reason == reason
    assert caught.value.retry_after is None or 0 <= caught.value.retry_after <= 3600
    assert_no_secret(caught.value, "rt-presented-7c41")


async def test_only_a_configured_refusal_is_final(stub: Stub, oauth: OAuthClient) -> None:
    stub.answer = reply(400, '{"error": "invalid_grant", "error_description": "{rt} {cs}"}')
    with pytest.raises(ProviderRejected) as caught:
        await oauth.refresh(provider_of(stub), "rt-presented-7c41")
    assert caught.value.reason == "invalid_grant"
    assert_no_secret(caught.value, "rt-presented-7c41")


# id -> (expires_in as the provider sends it, raw JSON text, what broker uses)
LIFETIMES: dict[str, tuple[str, int]] = {
    "a number": ("3600", 3600),
    "a numeric string (form-style)": ('"3600"', 3600),
    "a float": ("3599.9", 3599),
    "a tiny positive float": ("0.2", 1),
    "absent": ("", DEFAULT_EXPIRES_IN),
    "null": ("null", DEFAULT_EXPIRES_IN),
    "an empty string": ('""', DEFAULT_EXPIRES_IN),
    "a bool": ("true", DEFAULT_EXPIRES_IN),
    "an object": ('{"s": 3600}', DEFAULT_EXPIRES_IN),
    "a list": ("[3600]", DEFAULT_EXPIRES_IN),
    "a word": ('"soon"', DEFAULT_EXPIRES_IN),
    "zero": ("0", DEFAULT_EXPIRES_IN),
    "negative": ("-60", DEFAULT_EXPIRES_IN),
    "NaN as a string": ('"NaN"', DEFAULT_EXPIRES_IN),
    "infinite (1e400)": ("1e400", DEFAULT_EXPIRES_IN),
    "an integer beyond a float": ("1" + "0" * 400, DEFAULT_EXPIRES_IN),
    "absurdly long (a million years)": (str(10**6 * 366 * 86400), MAX_EXPIRES_IN),
}


@pytest.mark.parametrize("case", LIFETIMES, ids=list(LIFETIMES))
async def test_odd_lifetimes_keep_the_tokens(case: str, stub: Stub, oauth: OAuthClient) -> None:
    """The answer may carry a rotated refresh token, so it is never refused over
    ``expires_in``: an unusable value counts as not stated, an absurd one is capped."""
    raw, expected = LIFETIMES[case]
    field = f', "expires_in": {raw}' if raw else ""
    stub.answer = reply(200, f'{{"access_token": "at-new", "refresh_token": "rt-rotated"{field}}}')
    got = await oauth.refresh(provider_of(stub), "rt-presented")
    assert (got.access_token, got.refresh_token, got.expires_in) == (
        "at-new",
        "rt-rotated",
        expected,
    )


async def test_scope_as_a_list_is_joined_and_a_wrong_scope_dropped(
    stub: Stub, oauth: OAuthClient
) -> None:
    stub.answer = tokens(scope=["read", "write"])
    assert (await oauth.refresh(provider_of(stub), "rt")).scope == "read write"
    stub.answer = tokens(scope={"read": True})
    assert (await oauth.refresh(provider_of(stub), "rt")).scope is None


async def test_json_with_a_wrong_content_type_is_still_read(stub: Stub, oauth: OAuthClient) -> None:
    stub.answer = reply(200, '{"access_token": "at-new", "expires_in": 60}', "text/plain")
    assert (await oauth.refresh(provider_of(stub), "rt")).expires_in == 60


async def broker_on(
    stub: Stub, make_broker: BrokerFactory, clock: Clock, **settings: Any
) -> Broker:
    """A broker whose provider ``dev`` is the stub."""
    return await make_broker(
        clock,
        provider={
            "token_url": stub.url,
            "authorize_url": None,
            "revocation_url": None,
            "client_secret": CLIENT_SECRET,
            "client_auth": "client_secret_post",
        },
        **settings,
    )


BROKER_CASES = [
    "endless chunked body",
    "truncated JSON",
    "HTML page with 200",
    "200 with an error object",
    "access_token an object",
    "error echoing the secret",
    "429 with a NaN Retry-After",
]


@pytest.mark.parametrize("case", BROKER_CASES)
async def test_a_stored_grant_survives_any_answer(
    case: str,
    stub: Stub,
    make_broker: BrokerFactory,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    clock = Clock()
    broker = await broker_on(
        stub, make_broker, clock, redis_url=redis_server.url, key_prefix=key_prefix
    )
    SECRETS.add("rt-stored-5a8e31")
    status, _ = await broker.import_grant(
        "u", refresh_token="rt-stored-5a8e31", access_token="at-old", expires_in=600
    )
    assert status == 201
    clock.advance(3600)
    stub.answer = GARBAGE[case][0]

    status, body, headers = await broker.call("GET", "/v1/tokens/dev/u")
    assert (status, body["code"]) == (503, "upstream_unavailable")
    assert int(headers["Retry-After"]) >= 1
    assert GARBAGE[case][1] in body["detail"]
    assert "rt-stored-5a8e31" not in json.dumps(body)
    assert CLIENT_SECRET not in json.dumps(body)
    stored = await broker.app[STORE].read("dev", "u")
    assert stored is not None
    assert stored.refresh_token == "rt-stored-5a8e31"
    assert (stored.state, stored.last_error) == ("refresh_failing", GARBAGE[case][1])

    stub.answer = tokens(refresh_token="rt-rotated-5a8e31", expires_in=3600)
    SECRETS.add("rt-rotated-5a8e31")
    clock.advance(600)  # past any backoff
    status, body, _ = await broker.call("GET", "/v1/tokens/dev/u")
    assert (status, body["access_token"]) == (200, "at-new")
    assert stub.seen == ["rt-stored-5a8e31", "rt-stored-5a8e31"]


async def test_an_unusable_answer_carries_its_rotated_refresh_token_out_of_sight(
    stub: Stub, oauth: OAuthClient
) -> None:
    stub.answer = tokens(access_token=None, refresh_token="rt-rotated-in-garbage-9d2e")
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(provider_of(stub), "rt-presented-7c41")
    assert caught.value.reason == "malformed_response"
    assert caught.value.rotated_refresh_token == "rt-rotated-in-garbage-9d2e"
    assert_no_secret(caught.value, "rt-rotated-in-garbage-9d2e")
    stub.answer = tokens(access_token=None)  # no rotation: nothing to keep
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(provider_of(stub), "rt-presented-7c41")
    assert caught.value.rotated_refresh_token is None


async def test_a_refresh_token_rotated_in_an_unusable_answer_is_kept_and_used_next(
    stub: Stub, make_broker: BrokerFactory, redis_server: RedisServer, key_prefix: str
) -> None:
    """The provider rotated but its answer has no usable access token: the old refresh token
    is spent, so presenting it again would be a reuse (a strict provider revokes the grant).
    The new one is stored with the failure and presented next."""
    clock = Clock()
    broker = await broker_on(
        stub, make_broker, clock, redis_url=redis_server.url, key_prefix=key_prefix
    )
    SECRETS.update({"rt-first-31c7", "rt-second-31c7", "rt-third-31c7"})
    status, _ = await broker.import_grant(
        "u", refresh_token="rt-first-31c7", access_token="at-old", expires_in=600
    )
    assert status == 201
    clock.advance(3600)
    stub.answer = tokens(access_token={"bad": 1}, refresh_token="rt-second-31c7")

    status, body, _ = await broker.call("GET", "/v1/tokens/dev/u")
    assert (status, body["code"]) == (503, "upstream_unavailable")
    stored = await broker.app[STORE].read("dev", "u")
    assert stored is not None
    assert stored.refresh_token == "rt-second-31c7"
    assert (stored.state, stored.last_error) == ("refresh_failing", "malformed_response")

    stub.answer = tokens(refresh_token="rt-third-31c7", expires_in=3600)
    clock.advance(600)  # past any backoff
    status, body, _ = await broker.call("GET", "/v1/tokens/dev/u")
    assert (status, body["access_token"]) == (200, "at-new")
    assert stub.seen == ["rt-first-31c7", "rt-second-31c7"]
    stored = await broker.app[STORE].read("dev", "u")
    assert stored is not None
    assert (stored.refresh_token, stored.state) == ("rt-third-31c7", "active")
