"""The provider client against a real provider on loopback: dialects and error classes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.config import ProviderSettings, Secret
from broker.devprovider import DevProvider, FailureKind
from broker.errors import ProviderRejected, ProviderUnavailable
from broker.oauth import OAuthClient, _token_set


@pytest.fixture
async def oauth() -> AsyncIterator[OAuthClient]:
    async with aiohttp.ClientSession() as session:
        yield OAuthClient(session, timeout=0.5, connect_timeout=0.5, max_response_bytes=4096)


def settings_for(dev: DevProvider, **changes: object) -> ProviderSettings:
    """The dev provider's settings with ``changes``, validated as configured ones are."""
    base = {
        "name": "dev",
        "token_url": dev.token_url,
        "revocation_url": dev.revocation_url,
        "client_id": dev.settings.client_id,
        "client_secret": Secret(dev.settings.client_secret),
        "client_auth": dev.settings.client_auth,
    }
    return ProviderSettings.model_validate({**base, **changes})


async def test_refresh_returns_rotated_tokens(oauth: OAuthClient, provider: DevProvider) -> None:
    old = provider.issue_refresh_token()
    tokens = await oauth.refresh(settings_for(provider), old)
    assert tokens.refresh_token not in (None, old)
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == provider.settings.access_token_ttl
    assert tokens.scope == provider.settings.scope


async def test_form_encoded_answer_with_lowercase_bearer(
    oauth: OAuthClient, provider: DevProvider
) -> None:
    provider.settings.form_encoded = True
    provider.settings.access_token_ttl = 1234
    tokens = await oauth.refresh(settings_for(provider), provider.issue_refresh_token())
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == 1234
    assert tokens.access_token.startswith("at_")


async def test_missing_expires_in_uses_the_providers_default(
    oauth: OAuthClient, provider: DevProvider
) -> None:
    provider.settings.include_expires_in = False
    tokens = await oauth.refresh(
        settings_for(provider, default_expires_in=900), provider.issue_refresh_token()
    )
    assert tokens.expires_in == 900
    assert tokens.expires_stated is False  # a token without a refresh token keeps no default


@pytest.mark.parametrize(
    ("value", "stated"),
    [("3600", 3600), (120.7, 120), ("", None), ("soon", None), ("inf", None), (True, None)],
)
def test_an_unusable_expires_in_is_not_stated(value: object, stated: int | None) -> None:
    tokens = _token_set({"access_token": "a", "expires_in": value}, 900)
    assert (tokens.expires_in, tokens.expires_stated) == (stated or 900, stated is not None)


async def test_no_rotation_means_no_new_refresh_token(
    oauth: OAuthClient, provider: DevProvider
) -> None:
    provider.settings.rotate_refresh_tokens = False
    tokens = await oauth.refresh(settings_for(provider), provider.issue_refresh_token())
    assert tokens.refresh_token is None


async def test_wrong_client_auth_method_is_transient_not_final(
    oauth: OAuthClient, provider: DevProvider
) -> None:
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(
            settings_for(provider, client_auth="client_secret_post"),
            provider.issue_refresh_token(),
        )
    assert caught.value.reason == "invalid_client"


async def test_invalid_grant_is_final_and_configurable(
    oauth: OAuthClient, provider: DevProvider
) -> None:
    with pytest.raises(ProviderRejected) as caught:
        await oauth.refresh(settings_for(provider), "rt-unknown")
    assert caught.value.reason == "invalid_grant"
    provider.fail_next("invalid_client")
    with pytest.raises(ProviderRejected):
        await oauth.refresh(
            settings_for(provider, reauth_errors=("invalid_grant", "invalid_client")),
            provider.issue_refresh_token(),
        )


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ("server_error", "http_500"),
        ("rate_limited", "rate_limited"),
        ("garbage", "malformed_response"),
        ("no_access_token", "malformed_response"),
        ("slow", "timeout"),
    ],
)
async def test_transient_failures(
    oauth: OAuthClient, provider: DevProvider, failure: str, reason: str
) -> None:
    provider.fail_next(failure, retry_after=30, delay=2.0)  # type: ignore[arg-type]
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(settings_for(provider), provider.issue_refresh_token())
    assert caught.value.reason == reason
    if failure == "rate_limited":
        assert caught.value.retry_after == 30


async def test_unreachable_provider_is_a_connection_error(
    oauth: OAuthClient, provider: DevProvider
) -> None:
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(settings_for(provider, token_url="http://127.0.0.1:9/token"), "rt")
    assert caught.value.reason == "connection_error"


async def test_oversized_answer_is_refused(oauth: OAuthClient, aiohttp_server: object) -> None:
    async def huge(_: web.Request) -> web.Response:
        return web.json_response({"access_token": "x" * 10_000, "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/token", huge)
    server = await aiohttp_server(app)  # type: ignore[operator]
    provider = ProviderSettings(name="big", token_url=str(server.make_url("/token")), client_id="c")
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(provider, "rt")
    assert caught.value.reason == "response_too_large"


async def test_errors_never_carry_the_refresh_token(
    oauth: OAuthClient, provider: DevProvider
) -> None:
    refresh_token = provider.issue_refresh_token()
    failures: list[FailureKind] = ["server_error", "garbage", "rate_limited", "invalid_grant"]
    for failure in failures:
        provider.fail_next(failure)
        with pytest.raises((ProviderUnavailable, ProviderRejected)) as caught:
            await oauth.refresh(settings_for(provider), refresh_token)
        assert refresh_token not in repr(caught.value)
        assert provider.settings.client_secret not in str(caught.value)


async def test_revocation_outcomes(oauth: OAuthClient, provider: DevProvider) -> None:
    refresh_token = provider.issue_refresh_token()
    assert await oauth.revoke(settings_for(provider), refresh_token) == "revoked"
    assert provider.revocations[-1].token == refresh_token
    assert await oauth.revoke(settings_for(provider, revocation_url=None), "rt") == "not_supported"
    unreachable = settings_for(provider, revocation_url="http://127.0.0.1:9/revoke")
    assert await oauth.revoke(unreachable, "rt") == "failed"


@pytest.mark.parametrize("bypassed", [False, True])
async def test_the_environments_proxy_carries_provider_calls_unless_no_proxy_names_the_host(
    provider: DevProvider,
    aiohttp_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    bypassed: bool,
) -> None:
    """HTTP_PROXY / HTTPS_PROXY / NO_PROXY apply as aiohttp's trust_env would apply them (the
    app's session leaves them to OAuthClient, which looks them up once per URL)."""
    targets: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        targets.append(str(request.url))
        body = {"access_token": "at-via-proxy", "token_type": "Bearer", "expires_in": 60}
        return web.json_response(body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    server = await aiohttp_server(app)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    if bypassed:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with aiohttp.ClientSession(trust_env=False) as session:  # as the app's
        oauth = OAuthClient(session, timeout=2, connect_timeout=2, max_response_bytes=4096)
        for _ in range(2):
            tokens = await oauth.refresh(settings_for(provider), provider.issue_refresh_token())
    if bypassed:
        assert targets == []
        assert tokens.access_token.startswith("at_")  # the dev provider's own
    else:
        assert targets == [provider.token_url] * 2  # absolute-form: a proxy's request
        assert tokens.access_token == "at-via-proxy"
