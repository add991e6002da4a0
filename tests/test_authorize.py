"""The authorization-code flow end to end: a real browser-like client follows every redirect
between broker, the provider on loopback (which verifies PKCE and single-use, expiring codes)
and the calling application's page."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from yarl import URL

from broker.api import KEYRING, METRICS, STORE
from broker.authorization_states import PendingAuthorization
from broker.crypto import authorization_aad
from broker.devprovider import DevProvider
from tests.conftest import (
    SECRETS,
    Broker,
    BrokerFactory,
    Landing,
    connect,
    follow,
    free_port,
    path,
    start_authorization,
)

APP = "https://app.example/done"


@pytest.fixture
async def broker(make_broker: BrokerFactory, store_url: dict[str, str], landing: Landing) -> Broker:
    """A broker reachable at its public_url, on the embedded store and on a real Redis."""
    return await make_broker(
        port=free_port(), redirect_allowlist=[landing.url + "/", APP], **store_url
    )


def query_of(url: str | URL) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(str(url)).query))


def authorizations(broker: Broker, outcome: str) -> float:
    value = broker.app[METRICS].registry.get_sample_value(
        "broker_authorizations_total", {"provider": "dev", "outcome": outcome}
    )
    return value or 0.0


async def callback_location(browser: aiohttp.ClientSession, authorization_url: str) -> str:
    """Where the provider sends the browser back to (the callback URL), without going there."""
    async with browser.get(authorization_url, allow_redirects=False) as response:
        assert response.status == 302
        return response.headers["Location"]


async def assert_bad_state_page(response: aiohttp.ClientResponse, status: int = 400) -> str:
    text = await response.text()
    assert response.status == status
    assert response.content_type == "text/html"
    assert response.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in response.headers
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert text.lstrip().startswith("<!doctype html>")
    assert "Traceback" not in text
    return text


async def test_a_user_connects_through_the_whole_flow(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    status, started = await start_authorization(broker, "u-1", landing.url + "/done?flow=7")
    assert status == 201
    assert started["expires_at"].endswith("Z")
    url = started["authorization_url"]
    assert url.startswith(provider.authorize_url + "?")
    params = query_of(url)
    assert params["response_type"] == "code"
    assert params["client_id"] == provider.settings.client_id
    assert params["redirect_uri"] == f"{broker.settings.public_url}/oauth/dev/callback"
    assert params["scope"] == "public_api"
    assert params["state"] == started["state"]
    assert len(started["state"]) >= 43  # 32 random bytes
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43

    journey = await follow(browser, url)

    assert journey.status == 200
    assert [r.status for r in journey.history] == [302, 302]
    assert journey.url.path == "/done"
    assert journey.query == {"flow": "7", "status": "connected", "provider": "dev"}
    callback = journey.history[1]
    assert callback.headers["Cache-Control"] == "no-store"
    assert callback.headers["Referrer-Policy"] == "no-referrer"
    assert "Set-Cookie" not in callback.headers
    assert provider.code_exchanges == 1  # the provider checked the PKCE verifier
    status, grant = await broker.grant("u-1")
    assert status == 200
    assert (grant["state"], grant["scope"], grant["refresh_count"]) == ("active", "public_api", 0)
    assert grant["next_refresh_at"] is not None
    status, token = await broker.token("u-1")
    assert status == 200
    assert provider.access_token_expires_at(token["access_token"]) is not None
    assert provider.refresh_requests == 0  # the token from the code exchange is fresh
    assert authorizations(broker, "connected") == 1


async def test_a_connected_grant_is_on_the_refresh_schedule(
    broker: Broker, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    journey = await connect(broker, browser, "sched", landing.url + "/")
    assert journey.query["status"] == "connected"
    store = broker.app[STORE]
    due = await store.redis.zscore(store.keys.schedule_key("dev"), "c2NoZWQ")  # base64url("sched")
    assert due is not None
    assert due > broker.clock()


async def test_a_replayed_callback_exchanges_nothing(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    journey = await connect(broker, browser, "u-2", landing.url + "/")
    assert journey.query["status"] == "connected"
    before = await broker.grant("u-2")
    async with browser.get(journey.callback_url, allow_redirects=False) as response:
        text = await assert_bad_state_page(response)
    assert "already used" in text
    assert "start connecting your account again" in text
    assert provider.code_exchanges == 1
    assert await broker.grant("u-2") == before
    assert authorizations(broker, "invalid_state") == 1


async def test_two_callbacks_with_one_state_exchange_one_code(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    _, started = await start_authorization(broker, "u-3", landing.url + "/")
    callback = await callback_location(browser, started["authorization_url"])
    provider.hold()  # the first callback's code exchange stays in flight at the provider
    first = asyncio.create_task(follow(browser, callback))
    await provider.wait_for_token_requests(1)
    async with browser.get(callback, allow_redirects=False) as second:
        await assert_bad_state_page(second)
    provider.release()
    journey = await first
    assert journey.query["status"] == "connected"
    assert provider.code_exchanges == 1


async def test_denied_consent_comes_back_as_denied(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    provider.settings.deny_consent = True
    journey = await connect(broker, browser, "u-4", landing.url + "/back?status=connected")
    assert journey.status == 200
    assert journey.query == {"status": "denied", "provider": "dev"}  # not pre-settable
    assert provider.code_exchanges == 0
    assert (await broker.grant("u-4"))[0] == 404
    assert authorizations(broker, "denied") == 1


@pytest.mark.parametrize(
    ("error", "code"),
    [("server_error", "server_error"), ("temporarily_unavailable", "temporarily_unavailable"),
     ("<script>", "provider_error")],
)  # fmt: skip
async def test_other_provider_errors_come_back_as_error(
    broker: Broker, browser: aiohttp.ClientSession, landing: Landing, error: str, code: str
) -> None:
    _, started = await start_authorization(broker, "u-5", landing.url + "/")
    callback = URL(f"{broker.settings.public_url}/oauth/dev/callback").with_query(
        state=started["state"], error=error
    )
    journey = await follow(browser, str(callback))
    assert journey.query == {"status": "error", "code": code, "provider": "dev"}


@pytest.mark.parametrize(
    ("failure", "code"), [("server_error", "http_500"), ("invalid_client", "invalid_client")]
)
async def test_a_failed_code_exchange_comes_back_as_error(
    broker: Broker,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
    failure: Any,
    code: str,
) -> None:
    provider.fail_next(failure)
    journey = await connect(broker, browser, "u-6", landing.url + "/")
    assert journey.query == {"status": "error", "code": code, "provider": "dev"}
    assert (await broker.grant("u-6"))[0] == 404


async def test_an_expired_state_is_refused_before_any_exchange(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    _, started = await start_authorization(broker, "u-7", landing.url + "/")
    callback = await callback_location(browser, started["authorization_url"])
    broker.clock.advance(broker.settings.authorization_ttl + 1)
    async with browser.get(callback, allow_redirects=False) as response:
        await assert_bad_state_page(response)
    assert provider.code_exchanges == 0
    assert (await broker.grant("u-7"))[0] == 404


async def test_an_expired_code_is_refused_by_the_provider(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    provider.settings.code_ttl = 0  # expired when it arrives
    journey = await connect(broker, browser, "u-8", landing.url + "/")
    assert journey.query == {"status": "error", "code": "invalid_grant", "provider": "dev"}
    assert provider.code_exchanges == 1
    assert (await broker.grant("u-8"))[0] == 404


async def test_a_code_is_single_use_at_the_provider(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    first = await connect(broker, browser, "u-9", landing.url + "/")
    used_code = query_of(first.callback_url)["code"]
    _, started = await start_authorization(broker, "u-10", landing.url + "/")
    replay = URL(f"{broker.settings.public_url}/oauth/dev/callback").with_query(
        state=started["state"], code=used_code
    )
    journey = await follow(browser, str(replay))
    assert journey.query == {"status": "error", "code": "invalid_grant", "provider": "dev"}
    assert (await broker.grant("u-10"))[0] == 404
    # RFC 6749 4.1.2: the provider revoked what the replayed code bought
    broker.clock.advance(3600)
    assert (await broker.token("u-9"))[0] == 409


@pytest.mark.parametrize(
    "query",
    [{}, {"state": "never-issued"}, {"state": "x" * 300}, {"code": "c", "error": "access_denied"}],
    ids=["no-state", "unknown", "too-long", "error-without-state"],
)
async def test_a_bad_state_gets_a_small_html_page(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, query: dict[str, str]
) -> None:
    url = URL(f"{broker.settings.public_url}/oauth/dev/callback").with_query(query)
    async with browser.get(url, allow_redirects=False) as response:
        text = await assert_bad_state_page(response)
        assert response.headers["X-Request-Id"] in text  # a reference for support
    assert "never-issued" not in text
    assert provider.code_exchanges == 0


async def test_a_callback_for_an_unknown_provider_is_a_page_too(
    broker: Broker, browser: aiohttp.ClientSession
) -> None:
    url = f"{broker.settings.public_url}/oauth/nope/callback?state=s&code=c"
    async with browser.get(url, allow_redirects=False) as response:
        text = await assert_bad_state_page(response, status=404)
    assert "Unknown service" in text


async def test_a_state_started_for_another_provider_is_refused(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    table = {
        "token_url": provider.token_url,
        "authorize_url": provider.authorize_url,
        "client_id": provider.settings.client_id,
        "client_secret": provider.settings.client_secret,
    }
    broker = await make_broker(
        port=free_port(),
        redirect_allowlist=[landing.url + "/"],
        providers={"dev": table, "twin": table},
    )
    _, started = await start_authorization(broker, "u", landing.url + "/")
    code = query_of(await callback_location(browser, started["authorization_url"]))["code"]
    url = URL(f"{broker.settings.public_url}/oauth/twin/callback").with_query(
        state=started["state"], code=code
    )
    async with browser.get(url, allow_redirects=False) as response:
        await assert_bad_state_page(response)
    assert provider.code_exchanges == 0


async def test_pkce_can_be_turned_off_for_a_provider_that_rejects_it(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    provider.settings.require_pkce = False
    broker = await make_broker(
        port=free_port(), redirect_allowlist=[landing.url + "/"], provider={"pkce": False}
    )
    _, started = await start_authorization(broker, "u-np", landing.url + "/")
    assert "code_challenge" not in query_of(started["authorization_url"])
    journey = await follow(browser, started["authorization_url"])
    assert journey.query["status"] == "connected"  # and the exchange sent no verifier


async def test_reconnecting_replaces_a_grant_that_needs_reauth(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    await broker.import_grant("rita", refresh_token="rt-dead", access_token="at-x", expires_in=5)
    assert (await broker.token("rita"))[0] == 409
    assert (await broker.grant("rita"))[1]["state"] == "reauth_required"
    journey = await connect(broker, browser, "rita", landing.url + "/")
    assert journey.query["status"] == "connected"
    status, grant = await broker.grant("rita")
    assert (grant["state"], grant["last_error"], grant["refresh_count"]) == ("active", None, 0)
    status, token = await broker.token("rita")
    assert status == 200
    assert provider.access_token_expires_at(token["access_token"]) is not None
    broker.clock.advance(3600)  # and it refreshes: the new refresh token is the one stored
    assert (await broker.token("rita"))[0] == 200
    assert provider.reused_refresh_tokens == 0


OPEN_REDIRECTS = [
    "https://evil.example/done",
    "https://app.example.evil.example/done",
    "https://app.example@evil.example/done",
    "https://evil.example@app.example/done",
    "https://app.example:443@evil.example/done",
    "https://app.example%2eevil.example/done",
    "https://app.example%40evil.example/done",
    "//evil.example/done",
    "/done",
    "https:/\\evil.example/done",
    "https://app.example\\@evil.example/done",
    "https://app.example/done\\..\\..\\evil",
    "https://app.example/done/../../evil",
    "https://app.example/done/./x",
    "https://app.example/done/%2e%2e/admin",
    "https://app.example/done/%2E%2E/admin",
    "https://app.example/done%2f..%2fadmin",
    "https://app.example/done/%252e%252e/admin",
    "https://app.example/done/%5c..%5cadmin",
    "https://app.example/done//evil.example",
    "https://app.example/donezo",
    "https://app.example:8443/done",
    "http://app.example/done",
    "https://app.example./done",
    "https://app.example/done\t",
    "https://app.example/do\nne",
    "https://app.example/done evil",
    "https://\uff41pp.example/done",
    "javascript:alert(1)//https://app.example/done",
    "data:text/html,https://app.example/done",
    "https://app.example",
    "",
]


@pytest.mark.parametrize("redirect_after", OPEN_REDIRECTS)
async def test_open_redirect_attempts_are_refused(broker: Broker, redirect_after: str) -> None:
    status, body = await start_authorization(broker, "u", redirect_after)
    assert status == 400, redirect_after
    assert body["code"] == "invalid_request"
    assert "redirect_after" in body["detail"]
    assert authorizations(broker, "started") == 0


@pytest.mark.parametrize(
    "redirect_after",
    [APP, APP + "/", APP + "/sub/page?x=1&y=%2F#frag", "HTTPS://APP.example:443/done"],
)
async def test_allowed_redirects_are_accepted(broker: Broker, redirect_after: str) -> None:
    status, _ = await start_authorization(broker, "u", redirect_after)
    assert status == 201


async def test_a_provider_allowlist_extends_the_global_one(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(
        redirect_allowlist=[APP], provider={"redirect_allowlist": ["https://other.example/"]}
    )
    assert (await start_authorization(broker, "u", APP))[0] == 201
    assert (await start_authorization(broker, "u", "https://other.example/x"))[0] == 201
    assert (await start_authorization(broker, "u", "https://third.example/"))[0] == 400


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"user_id": "u"}, "redirect_after"),
        ({"redirect_after": APP}, "user_id"),
        ({"user_id": "", "redirect_after": APP}, "user id"),
        ({"user_id": "a\nb", "redirect_after": APP}, "control"),
        ({"user_id": "u", "redirect_after": APP, "scope": 7}, "scope"),
        ({"user_id": "u", "redirect_after": APP, "scope": "a  b"}, "scope"),
        ({"user_id": "u", "redirect_after": APP, "scope": 'a "b"'}, "scope"),
        ({"user_id": "u", "redirect_after": APP, "extra": 1}, "extra"),
    ],
)
async def test_malformed_starts_are_400(
    broker: Broker, body: dict[str, Any], fragment: str
) -> None:
    status, problem, _ = await broker.call("POST", "/v1/authorizations/dev", json=body)
    assert status == 400
    assert problem["code"] == "invalid_request"
    assert fragment in problem["detail"]


async def test_starting_needs_grants_write_a_known_provider_and_an_authorize_url(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    from broker.auth import hash_key, new_api_key

    broker = await make_broker(redirect_allowlist=[APP], provider={"authorize_url": None})
    status, problem = await start_authorization(broker, "u", APP)
    assert (status, problem["code"]) == (400, "invalid_request")
    assert "authorize_url" in problem["detail"]
    status, problem = await start_authorization(broker, "u", APP, provider="nope")
    assert (status, problem["code"]) == (404, "provider_not_found")
    reader = new_api_key()
    SECRETS.add(reader)
    broker = await make_broker(
        redirect_allowlist=[APP],
        clients=[
            {
                "name": "reader",
                "key_sha256": hash_key(reader),
                "providers": ["*"],
                "permissions": ["grants:read", "tokens:read"],
            }
        ],
    )
    broker.api_key = reader
    status, problem = await start_authorization(broker, "u", APP)
    assert (status, problem["code"]) == (403, "forbidden")
    broker.api_key = "brk_unknown"
    assert (await start_authorization(broker, "u", APP))[0] == 401


async def test_pending_authorizations_hold_no_secret_in_clear(
    make_broker: BrokerFactory, redis_server: Any, key_prefix: str
) -> None:
    broker = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, redirect_allowlist=[APP]
    )
    _, started = await start_authorization(broker, "carol@example.com", APP + "/secret-path")
    state = started["state"]
    store = broker.app[STORE]
    key = store.keys.authorization_key(hashlib.sha256(state.encode()).hexdigest())
    keys = [k async for k in store.redis.scan_iter(match=f"{key_prefix}:authz:*")]
    assert keys == [key.encode()]
    raw = await store.redis.get(key)
    assert isinstance(raw, bytes)
    ttl = await store.redis.pttl(key)
    assert 0 < ttl <= broker.settings.authorization_ttl * 1000
    pending = PendingAuthorization.from_payload(
        broker.app[KEYRING].decrypt(raw, authorization_aad(key))
    )
    assert pending.code_verifier is not None
    SECRETS.add(pending.code_verifier)
    for clear in (state, pending.code_verifier, "carol@example.com", "secret-path"):
        assert clear.encode() not in raw
        assert clear.encode() not in key.encode()
    assert pending.code_verifier not in repr(pending)


async def test_a_narrower_grant_is_recorded_on_the_grant(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    provider.settings.grantable_scopes = ("public_api",)  # the user unticked "admin"
    journey = await connect(broker, browser, "nora", landing.url + "/", scope="public_api admin")
    assert query_of(journey.history[0].url)["scope"] == "public_api admin"
    assert journey.query["status"] == "connected"
    _, grant = await broker.grant("nora")
    assert grant["scope"] == "public_api"
    assert (await broker.token("nora"))[1]["scope"] == "public_api"


async def test_the_delete_after_connecting_revokes_at_the_provider(
    broker: Broker, provider: DevProvider, browser: aiohttp.ClientSession, landing: Landing
) -> None:
    await connect(broker, browser, "olga", landing.url + "/")
    token = (await broker.token("olga"))[1]["access_token"]
    status, _, headers = await broker.call("DELETE", path("grants", "olga"))
    assert (status, headers["Broker-Revocation"]) == (204, "revoked")
    revocation = provider.revocations[-1]
    assert (revocation.token_type_hint, revocation.authenticated) == ("refresh_token", True)
    assert provider.auth_methods_seen[-1] == provider.settings.client_auth
    assert provider.access_token_expires_at(token) is None  # the grant died with it
