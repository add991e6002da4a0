"""The fake provider over real HTTP: the rest of the suite trusts it to behave like a strict one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import aiohttp
import pytest

from broker.devprovider import DevProvider, DevProviderSettings

REDIRECT = "https://broker.example/oauth/dev/callback?x=1"
VERIFIER = "v" * 43 + "-._~"


@pytest.fixture
async def dev() -> AsyncIterator[DevProvider]:
    provider = DevProvider(DevProviderSettings(client_id="id:é%", client_secret="s3:cr%t"))
    await provider.start()
    yield provider
    await provider.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def basic(client_id: str, secret: str) -> dict[str, str]:
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


async def post(
    http: aiohttp.ClientSession, dev: DevProvider, path: str, form: dict[str, str], **kw: Any
) -> tuple[int, Any, Mapping[str, str]]:
    """(status, parsed body, headers) of a POST authenticated the way ``dev`` wants."""
    s = dev.settings
    if s.client_auth == "client_secret_basic":
        kw.setdefault("headers", basic(s.client_id, s.client_secret))
    else:
        form = {"client_id": s.client_id, "client_secret": s.client_secret, **form}
    async with http.post(dev.base_url + path, data=form, **kw) as response:
        text = await response.text()
        if response.content_type == "application/json":
            return response.status, json.loads(text), response.headers
        if response.content_type == "application/x-www-form-urlencoded":
            return response.status, {k: v[0] for k, v in parse_qs(text).items()}, response.headers
        return response.status, text, response.headers


async def refresh(http: aiohttp.ClientSession, dev: DevProvider, rt: str) -> tuple[int, Any]:
    status, body, _ = await post(
        http, dev, "/token", {"grant_type": "refresh_token", "refresh_token": rt}
    )
    return status, body


async def test_rotation_kills_the_old_refresh_token_and_counts_reuse(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    old = dev.issue_refresh_token("ann")
    status, body = await refresh(http, dev, old)
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "public_api"
    assert body["refresh_token"] != old
    assert dev.access_token_expires_at(body["access_token"]) is not None
    assert await refresh(http, dev, old) == (400, {"error": "invalid_grant"})
    assert dev.reused_refresh_tokens == 1
    assert await refresh(http, dev, "rt_unknown") == (400, {"error": "invalid_grant"})
    assert dev.reused_refresh_tokens == 1  # an unknown token is no reuse
    assert (dev.token_requests, dev.refresh_requests) == (3, 3)
    assert old in dev.secrets()
    assert dev.settings.client_secret in dev.secrets()


async def introspect(http: aiohttp.ClientSession, dev: DevProvider, token: str) -> bool:
    """Whether the provider says ``token`` is active."""
    status, body, _ = await post(http, dev, "/introspect", {"token": token})
    assert status == 200
    active: bool = body["active"]
    return active


async def test_reusing_a_rotated_out_refresh_token_revokes_its_whole_grant(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    first = dev.issue_refresh_token("ann")
    _, one = await refresh(http, dev, first)
    _, two = await refresh(http, dev, one["refresh_token"])
    live, access_tokens = two["refresh_token"], [one["access_token"], two["access_token"]]
    assert await introspect(http, dev, live)
    assert await refresh(http, dev, one["refresh_token"]) == (400, {"error": "invalid_grant"})
    assert dev.reused_refresh_tokens == 1
    # RFC 9700 4.14.2: the provider cannot tell which presenter is the thief, so neither keeps
    # the grant: its live refresh token and every access token it bought die with it.
    assert await refresh(http, dev, live) == (400, {"error": "invalid_grant"})
    assert not await introspect(http, dev, live)
    for token in access_tokens:
        assert not await introspect(http, dev, token)
        assert dev.access_token_expires_at(token) is None
    assert dev.reused_refresh_tokens == 1  # the live token of a revoked grant is no reuse


async def test_reuse_leaves_other_grants_alone(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    _, victim = await refresh(http, dev, dev.issue_refresh_token("ann"))
    _, same_user = await refresh(http, dev, dev.issue_refresh_token("ann"))  # a second grant
    _, other_user = await refresh(http, dev, dev.issue_refresh_token("bob"))
    _, victim_next = await refresh(http, dev, victim["refresh_token"])
    assert (await refresh(http, dev, victim["refresh_token"]))[0] == 400
    assert dev.reused_refresh_tokens == 1
    assert dev.access_token_expires_at(victim_next["access_token"]) is None
    for body in (same_user, other_user):
        assert await introspect(http, dev, body["access_token"])
        assert dev.access_token_expires_at(body["access_token"]) is not None
        status, later = await refresh(http, dev, body["refresh_token"])
        assert status == 200
        assert await introspect(http, dev, later["access_token"])
    assert dev.reused_refresh_tokens == 1


async def test_a_forgiving_provider_counts_reuse_and_keeps_the_grant(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    dev.settings.revoke_on_reuse = False
    first = dev.issue_refresh_token("ann")
    _, body = await refresh(http, dev, first)
    assert await refresh(http, dev, first) == (400, {"error": "invalid_grant"})
    assert dev.reused_refresh_tokens == 1
    assert await introspect(http, dev, body["access_token"])
    status, later = await refresh(http, dev, body["refresh_token"])
    assert status == 200
    assert await introspect(http, dev, later["access_token"])
    dev.settings.revoke_on_reuse = None  # back to the default: on, since tokens rotate
    assert dev.settings.reuse_revokes
    assert (await refresh(http, dev, body["refresh_token"]))[0] == 400
    assert dev.access_token_expires_at(later["access_token"]) is None
    assert dev.reused_refresh_tokens == 2


async def test_without_rotation_the_same_refresh_token_works_again_and_again(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    dev.settings.rotate_refresh_tokens = False
    assert not dev.settings.reuse_revokes
    kept = dev.issue_refresh_token("ann")
    access_tokens = []
    for _ in range(3):
        status, body = await refresh(http, dev, kept)
        assert status == 200
        assert "refresh_token" not in body
        access_tokens.append(body["access_token"])
    assert dev.reused_refresh_tokens == 0
    assert await introspect(http, dev, kept)
    for token in access_tokens:
        assert await introspect(http, dev, token)
    assert (dev.token_requests, dev.refresh_requests) == (3, 3)


async def test_client_authentication_method_is_enforced(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    rt = dev.issue_refresh_token()
    grant = {"grant_type": "refresh_token", "refresh_token": rt}
    secret_in_body = {**grant, "client_id": dev.settings.client_id, "client_secret": "s3:cr%t"}
    unencoded = "Basic " + base64.b64encode("id:é%:s3:cr%t".encode()).decode()
    for headers, form in [
        ({}, secret_in_body),  # right secret, wrong method
        ({}, grant),
        ({"Authorization": unencoded}, grant),  # RFC 6749 2.3.1 wants each part urlencoded
        (basic(dev.settings.client_id, "wrong"), grant),
    ]:
        async with http.post(dev.token_url, data=form, headers=headers) as response:
            assert response.status == 401
            assert await response.json() == {"error": "invalid_client"}
            assert response.headers["WWW-Authenticate"] == 'Basic realm="dev"'
    assert (await refresh(http, dev, rt))[0] == 200
    dev.settings.client_auth = "client_secret_post"
    headers = basic(dev.settings.client_id, dev.settings.client_secret)
    async with http.post(dev.token_url, data=grant, headers=headers) as response:
        assert response.status == 401
    assert dev.auth_methods_seen == [
        "client_secret_post", "none", "client_secret_basic", "client_secret_basic",
        "client_secret_basic", "client_secret_basic",
    ]  # fmt: skip
    rt = dev.issue_refresh_token()
    assert (await refresh(http, dev, rt))[0] == 200
    assert dev.auth_methods_seen[-1] == "client_secret_post"


async def test_form_encoded_answer(dev: DevProvider, http: aiohttp.ClientSession) -> None:
    dev.settings.form_encoded = True
    dev.settings.include_expires_in = False
    status, body, headers = await post(
        http,
        dev,
        "/token",
        {"grant_type": "refresh_token", "refresh_token": dev.issue_refresh_token()},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert headers["Cache-Control"] == "no-store"
    assert set(body) == {"access_token", "token_type", "refresh_token", "scope"}
    assert body["token_type"] == "bearer"


async def test_injected_failures_are_consumed_in_order_and_spend_nothing(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    rt = dev.issue_refresh_token()
    dev.fail_next("rate_limited", retry_after=7)
    dev.fail_next("garbage")
    dev.fail_next("invalid_grant")
    status, _, headers = await post(
        http, dev, "/token", {"grant_type": "refresh_token", "refresh_token": rt}
    )
    assert (status, headers["Retry-After"]) == (429, "7")
    assert await refresh(http, dev, rt) == (200, "<html>oops")
    assert await refresh(http, dev, rt) == (400, {"error": "invalid_grant"})
    dev.fail_always("no_access_token")
    assert await refresh(http, dev, rt) == (200, {"token_type": "Bearer"})
    dev.heal()
    status, _ = await refresh(http, dev, rt)  # the same token: failures spent nothing
    assert status == 200
    assert dev.reused_refresh_tokens == 0


async def test_hold_keeps_a_request_in_flight(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    dev.hold()
    call = asyncio.create_task(refresh(http, dev, dev.issue_refresh_token()))
    await dev.wait_for_token_requests(1)
    assert not call.done()
    with pytest.raises(TimeoutError):
        await dev.wait_for_token_requests(2, timeout=0.01)
    dev.release()
    assert (await call)[0] == 200


async def test_abandoned_slow_refresh_does_not_rotate_the_token(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    rt = dev.issue_refresh_token()
    dev.fail_next("slow", delay=30.0)
    with pytest.raises(TimeoutError):
        await post(
            http,
            dev,
            "/token",
            {"grant_type": "refresh_token", "refresh_token": rt},
            timeout=aiohttp.ClientTimeout(total=0.05),
        )
    assert (await refresh(http, dev, rt))[0] == 200
    await dev.close()  # does not wait out the delay
    assert dev.reused_refresh_tokens == 0
    dev.fail_next("slow", delay=0.05)  # a caller who waits gets an answer
    await dev.start()
    assert (await refresh(http, dev, dev.issue_refresh_token()))[0] == 200


def challenge(verifier: str) -> str:
    return (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )


async def authorize(http: aiohttp.ClientSession, dev: DevProvider, **params: str) -> Any:
    query = {
        "response_type": "code",
        "client_id": dev.settings.client_id,
        "redirect_uri": REDIRECT,
        "state": "st-1",
        "code_challenge": challenge(VERIFIER),
        "code_challenge_method": "S256",
        **params,
    }
    query = {k: v for k, v in query.items() if v}
    async with http.get(dev.authorize_url, params=query, allow_redirects=False) as response:
        if response.status != 302:
            return response.status
        location = urlsplit(response.headers["Location"])
        assert location._replace(query="").geturl() == REDIRECT.split("?")[0]
        return {k: v[0] for k, v in parse_qs(location.query).items()}


async def exchange(
    http: aiohttp.ClientSession, dev: DevProvider, code: str, verifier: str = VERIFIER
) -> tuple[int, Any]:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    status, body, _ = await post(http, dev, "/token", {**form, "code_verifier": verifier})
    return status, body


async def test_code_flow_with_pkce(dev: DevProvider, http: aiohttp.ClientSession) -> None:
    back = await authorize(http, dev, scope="read write")
    assert back["state"] == "st-1"
    assert back["x"] == "1"
    status, body = await exchange(http, dev, back["code"])
    assert status == 200
    assert body["scope"] == "read write"
    assert (await refresh(http, dev, body["refresh_token"]))[0] == 200
    # replay: refused, and what the code bought is revoked (RFC 6749 4.1.2)
    assert await exchange(http, dev, back["code"]) == (400, {"error": "invalid_grant"})
    assert dev.access_token_expires_at(body["access_token"]) is None
    wrong = (await authorize(http, dev))["code"]
    assert await exchange(http, dev, wrong, "w" * 43) == (400, {"error": "invalid_grant"})
    assert dev.code_exchanges == 3
    assert await authorize(http, dev, code_challenge="", code_challenge_method="") == 400
    assert await authorize(http, dev, code_challenge_method="plain") == 400
    assert await authorize(http, dev, client_id="other") == 400
    assert await authorize(http, dev, state="") == 400
    dev.settings.deny_consent = True
    assert await authorize(http, dev) == {"error": "access_denied", "state": "st-1", "x": "1"}


async def test_revoke_then_refresh_is_invalid_grant(
    dev: DevProvider, http: aiohttp.ClientSession
) -> None:
    _, body = await refresh(http, dev, dev.issue_refresh_token())
    rt, at = body["refresh_token"], body["access_token"]
    _, seen, _ = await post(http, dev, "/introspect", {"token": at})
    assert seen["active"]
    assert {"scope", "client_id", "exp", "token_type"} <= set(seen)
    form = {"token": rt, "token_type_hint": "refresh_token"}
    async with http.post(dev.revocation_url, data=form) as response:
        assert response.status == 401  # unauthenticated
    assert (await post(http, dev, "/revoke", form))[0] == 200
    assert (await post(http, dev, "/revoke", {"token": "unknown"}))[0] == 200
    assert [(r.token, r.authenticated) for r in dev.revocations] == [
        (rt, False),
        (rt, True),
        ("unknown", True),
    ]
    assert await refresh(http, dev, rt) == (400, {"error": "invalid_grant"})
    assert dev.access_token_expires_at(at) is None
    assert (await post(http, dev, "/introspect", {"token": at}))[1] == {"active": False}


async def test_discovery_document(dev: DevProvider, http: aiohttp.ClientSession) -> None:
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        async with http.get(dev.base_url + path) as response:
            doc = await response.json()
        assert doc["issuer"] == dev.issuer == dev.base_url
        assert doc["authorization_endpoint"] == dev.authorize_url
        assert doc["token_endpoint"] == dev.token_url
        assert doc["revocation_endpoint"] == dev.revocation_url
        assert doc["introspection_endpoint"] == dev.introspection_url
        assert doc["grant_types_supported"] == [
            "authorization_code",
            "refresh_token",
            "client_credentials",
        ]
        assert doc["token_endpoint_auth_methods_supported"] == ["client_secret_basic"]
        assert doc["code_challenge_methods_supported"] == ["S256"]


@contextlib.asynccontextmanager
async def standalone(*args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[str]:
    """``python -m broker.devprovider`` on a free port: its base URL, from the line it prints;
    on the way out, SIGTERM must stop it cleanly."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.devprovider", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        yield line.split()[-1]
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_standalone_process_prints_its_url_and_stops_on_sigterm() -> None:
    env = {**os.environ, "DEV_SECRET": "from-env"}
    args = ("--client-secret-env", "DEV_SECRET", "--client-auth", "client_secret_post")
    async with standalone(*args, "--form-encoded", env=env) as base_url:
        form = {"grant_type": "refresh_token", "refresh_token": "rt_x", "client_id": "broker-dev"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(base_url + "/token", data={**form, "client_secret": "from-env"}) as resp,
        ):
            assert (resp.status, await resp.json()) == (400, {"error": "invalid_grant"})


@pytest.mark.parametrize(("args", "revokes"), [((), True), (("--forgive-reuse",), False)])
async def test_standalone_process_revokes_on_reuse_unless_told_to_forgive(
    http: aiohttp.ClientSession, args: tuple[str, ...], revokes: bool
) -> None:
    async with standalone(*args) as base_url:
        remote = DevProvider()  # never started: its settings and URL describe the process
        remote.base_url = base_url
        status, body = await exchange(http, remote, (await authorize(http, remote))["code"])
        assert status == 200
        _, rotated = await refresh(http, remote, body["refresh_token"])
        assert await refresh(http, remote, body["refresh_token"]) == (
            400,
            {"error": "invalid_grant"},
        )
        status, _ = await refresh(http, remote, rotated["refresh_token"])
        assert status == (400 if revokes else 200)
        assert await introspect(http, remote, rotated["access_token"]) is not revokes
