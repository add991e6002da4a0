"""The shipped provider profiles (examples/providers), each against the fake provider set to
behave like that provider, through the whole authorization-code flow and beyond."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from broker.api import SETTINGS
from broker.app import create_app
from broker.auth import hash_key, new_api_key
from broker.config import build_settings
from broker.devprovider import DevProvider
from broker.errors import ConfigError
from tests.conftest import (
    SECRETS,
    Broker,
    BrokerFactory,
    Landing,
    broker_settings,
    connect,
    free_port,
    path,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROFILES = sorted(p.stem for p in (EXAMPLES / "providers").glob("*.toml"))
DAY = 86400


def profile(name: str) -> dict[str, Any]:
    """The profile's provider table as shipped."""
    document = tomllib.loads((EXAMPLES / "providers" / f"{name}.toml").read_text("utf-8"))
    table: dict[str, Any] = document["providers"][name]
    return table


def against(dev: DevProvider, table: dict[str, Any]) -> dict[str, Any]:
    """The profile with its endpoints and credentials pointed at ``dev``; every other setting
    (client authentication, scopes, lifetimes) is the profile's own."""
    endpoints = {
        "token_url": dev.token_url,
        "authorize_url": dev.authorize_url,
        "revocation_url": dev.revocation_url,
        "issuer": dev.issuer,
        "discovery_url": dev.base_url + "/.well-known/openid-configuration",
    }
    moved = {key: endpoints.get(key, value) for key, value in table.items()}
    del moved["client_secret_env"]
    dev.settings.client_id = moved["client_id"]
    dev.settings.client_auth = moved.get("client_auth", "client_secret_basic")
    moved["client_secret"] = dev.settings.client_secret
    moved.pop("redirect_allowlist", None)
    return moved


async def broker_for(
    make_broker: BrokerFactory, dev: DevProvider, landing: Landing, name: str, **changes: Any
) -> Broker:
    table = {**against(dev, profile(name)), **changes}
    return await make_broker(
        port=free_port(), redirect_allowlist=[landing.url + "/"], providers={name: table}
    )


async def grant(broker: Broker, user_id: str, provider: str) -> dict[str, Any]:
    status, body, _ = await broker.call("GET", path("grants", user_id, provider))
    assert status == 200, body
    result: dict[str, Any] = body
    return result


async def token(broker: Broker, user_id: str, provider: str) -> dict[str, Any]:
    status, body, _ = await broker.call("GET", path("tokens", user_id, provider))
    assert status == 200, body
    result: dict[str, Any] = body
    return result


def test_the_profiles_are_the_ones_documented() -> None:
    assert PROFILES == [
        "adobe-ims",
        "alfresco",
        "alfresco-process-services",
        "cloud66",
        "oidc-generic",
        "skyvault",
    ]
    guide = (EXAMPLES.parent / "docs" / "providers.md").read_text("utf-8")
    for name in PROFILES:
        assert f"examples/providers/{name}.toml" in guide


@pytest.mark.parametrize("name", PROFILES)
def test_every_example_profile_is_a_valid_configuration(name: str) -> None:
    text = (EXAMPLES / "providers" / f"{name}.toml").read_text("utf-8")
    raw = tomllib.loads(text)
    assert list(raw) == ["providers"]
    assert list(raw["providers"]) == [name]  # the table is named like its file
    table = raw["providers"][name]
    assert "client_secret" not in table  # secrets are referenced, never inlined
    environ = {table["client_secret_env"]: "dummy-secret-for-the-test"}
    settings = build_settings(raw, environ, base_dir=EXAMPLES)
    assert settings.providers[name].client_secret is not None


def test_the_example_broker_configuration_is_valid() -> None:
    raw = tomllib.loads((EXAMPLES / "broker.toml").read_text("utf-8"))
    assert build_settings(raw, {}, base_dir=EXAMPLES).providers


async def test_alfresco_rotates_refresh_tokens_that_live_28_days(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    provider.settings.access_token_ttl = 3600
    provider.settings.rotate_refresh_tokens = True
    broker = await broker_for(make_broker, provider, landing, "alfresco")
    journey = await connect(broker, browser, "ann", landing.url + "/", provider="alfresco")
    assert journey.query["status"] == "connected"
    assert dict(parse_qsl(urlsplit(str(journey.history[0].url)).query))["scope"] == "public_api"
    assert provider.auth_methods_seen[-1] == "client_secret_post"
    connected = await grant(broker, "ann", "alfresco")
    assert (connected["scope"], connected["refresh_count"]) == ("public_api", 0)
    assert 3590 <= (await token(broker, "ann", "alfresco"))["expires_in"] <= 3600
    for _ in range(3):  # each refresh spends the refresh token and stores the new one
        broker.clock.advance(3600)
        await token(broker, "ann", "alfresco")
    assert provider.refresh_requests == 3
    assert provider.reused_refresh_tokens == 0
    status = await grant(broker, "ann", "alfresco")
    assert status["refresh_count"] == 3
    issued = status["refresh_token_issued_at"]
    assert issued > connected["refresh_token_issued_at"]  # a new refresh token each time
    assert status["refresh_token_expires_at"] == iso_plus(issued, 28 * DAY)


async def test_skyvault_codes_expire_and_refresh_tokens_live_7_days(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    provider.settings.code_ttl = 600
    broker = await broker_for(make_broker, provider, landing, "skyvault")
    journey = await connect(broker, browser, "sam", landing.url + "/", provider="skyvault")
    assert journey.query["status"] == "connected"
    status = await grant(broker, "sam", "skyvault")
    assert status["scope"] == "public_api"
    assert status["refresh_token_expires_at"] == iso_plus(
        status["refresh_token_issued_at"], 7 * DAY
    )
    provider.settings.code_ttl = 0  # the user came back after the code's 10 minutes
    journey = await connect(broker, browser, "sid", landing.url + "/", provider="skyvault")
    assert journey.query == {"status": "error", "code": "invalid_grant", "provider": "skyvault"}


async def test_cloud66_answers_an_access_token_alone_form_encoded(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    # Cloud 66's documented answer: access_token=...&token_type=bearer, nothing else.
    provider.settings.form_encoded = True
    provider.settings.include_expires_in = False
    provider.settings.include_scope = False
    provider.settings.issue_refresh_tokens = False
    broker = await broker_for(make_broker, provider, landing, "cloud66")
    journey = await connect(broker, browser, "cy", landing.url + "/", provider="cloud66")
    assert journey.query["status"] == "connected"
    assert provider.auth_methods_seen[-1] == "client_secret_post"
    answer = await token(broker, "cy", "cloud66")
    assert answer["token_type"] == "Bearer"  # what goes into the Authorization header
    assert (answer["expires_at"], answer["expires_in"]) == (None, None)
    assert answer["scope"] == "public redeploy"  # no scope in the answer: the requested one
    status = await grant(broker, "cy", "cloud66")
    assert (status["has_refresh_token"], status["next_refresh_at"]) == (False, None)
    broker.clock.advance(90 * DAY)
    assert (await token(broker, "cy", "cloud66"))["access_token"] == answer["access_token"]
    assert (provider.token_requests, provider.code_exchanges) == (1, 1)


async def test_adobe_ims_always_asks_for_offline_access_and_revokes(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    provider.settings.offline_scope = "offline_access"  # no refresh token without it
    broker = await broker_for(make_broker, provider, landing, "adobe-ims")
    journey = await connect(
        broker, browser, "ada", landing.url + "/", provider="adobe-ims", scope="openid AdobeID"
    )
    asked = dict(parse_qsl(urlsplit(str(journey.history[0].url)).query))["scope"]
    assert asked == "openid AdobeID offline_access"
    assert journey.query["status"] == "connected"
    access = (await token(broker, "ada", "adobe-ims"))["access_token"]
    status, _, headers = await broker.call("DELETE", path("grants", "ada", "adobe-ims"))
    assert (status, headers["Broker-Revocation"]) == (204, "revoked")
    revocation = provider.revocations[-1]
    assert (revocation.token_type_hint, revocation.authenticated) == ("refresh_token", True)
    assert provider.auth_methods_seen[-1] == "client_secret_post"
    assert provider.access_token_expires_at(access) is None


async def test_without_offline_access_adobe_issues_no_refresh_token(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    provider.settings.offline_scope = "offline_access"
    broker = await broker_for(make_broker, provider, landing, "adobe-ims", required_scopes=[])
    journey = await connect(broker, browser, "ada", landing.url + "/", provider="adobe-ims")
    assert journey.query == {"status": "error", "code": "no_refresh_token", "provider": "adobe-ims"}
    status, _, _ = await broker.call("GET", path("grants", "ada", "adobe-ims"))
    assert status == 404


async def test_alfresco_process_services_basic_auth_and_introspection(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    name = "alfresco-process-services"
    broker = await broker_for(make_broker, provider, landing, name)
    journey = await connect(broker, browser, "pia", landing.url + "/", provider=name)
    assert journey.query["status"] == "connected"
    assert provider.auth_methods_seen[-1] == "client_secret_basic"
    access = (await token(broker, "pia", name))["access_token"]
    assert (await introspect(browser, provider, access))["active"] is True
    status, _, headers = await broker.call("DELETE", path("grants", "pia", name))
    assert (status, headers["Broker-Revocation"]) == (204, "revoked")
    assert provider.revocations[-1].authenticated
    assert provider.auth_methods_seen[-1] == "client_secret_basic"
    assert await introspect(browser, provider, access) == {"active": False}


async def test_alfresco_process_services_hands_out_app_tokens(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
) -> None:
    name = "alfresco-process-services"
    broker = await broker_for(make_broker, provider, landing, name)
    status, body, _ = await broker.call("GET", f"/v1/app-tokens/{name}?scope=openid")
    assert status == 200, body
    assert (body["scope"], provider.auth_methods_seen) == ("openid", ["client_secret_basic"])
    assert (await introspect(browser, provider, body["access_token"]))["active"] is True


@pytest.mark.parametrize("setting", ["issuer", "discovery_url"])
async def test_a_generic_oidc_provider_is_discovered_at_start_up(
    make_broker: BrokerFactory,
    provider: DevProvider,
    browser: aiohttp.ClientSession,
    landing: Landing,
    setting: str,
) -> None:
    table = against(provider, profile("oidc-generic"))
    if setting == "discovery_url":
        table["discovery_url"] = table.pop("issuer").rstrip("/") + (
            "/.well-known/oauth-authorization-server"
        )
    broker = await make_broker(
        port=free_port(), redirect_allowlist=[landing.url + "/"], providers={"oidc": table}
    )
    resolved = broker.app[SETTINGS].providers["oidc"]
    assert resolved.token_url == provider.token_url
    assert resolved.authorize_url == provider.authorize_url
    assert resolved.revocation_url == provider.revocation_url
    journey = await connect(broker, browser, "olly", landing.url + "/", provider="oidc")
    assert journey.query["status"] == "connected"
    assert "offline_access" in dict(parse_qsl(urlsplit(str(journey.history[0].url)).query))["scope"]
    await token(broker, "olly", "oidc")
    status, _, headers = await broker.call("DELETE", path("grants", "olly", "oidc"))
    assert (status, headers["Broker-Revocation"]) == (204, "revoked")
    assert provider.revocations[-1].authenticated


async def test_configured_endpoints_win_over_discovered_ones(
    make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(
        provider={"issuer": provider.issuer, "revocation_url": None, "token_url": None}
        | {"authorize_url": "https://elsewhere.example/authorize"}
    )
    resolved = broker.app[SETTINGS].providers["dev"]
    assert resolved.authorize_url == "https://elsewhere.example/authorize"
    assert resolved.token_url == provider.token_url
    assert resolved.revocation_url == provider.revocation_url


@pytest.mark.parametrize(
    ("change", "setting", "message"),
    [
        ({"issuer": "http://127.0.0.1:9/"}, "providers.dev.issuer", "connection_error"),
        ({"discovery_url": "/nothing-here"}, "providers.dev.discovery_url", "http_404"),
        (
            {
                "issuer": "https://other.example",
                "discovery_url": "/.well-known/openid-configuration",
            },
            "providers.dev.discovery_url",
            "another issuer",
        ),
    ],
)
async def test_start_up_fails_naming_the_provider_when_discovery_fails(
    provider: DevProvider, change: dict[str, str], setting: str, message: str
) -> None:
    change = {k: provider.base_url + v if v.startswith("/") else v for k, v in change.items()}
    api_key = new_api_key()
    SECRETS.add(api_key)
    settings = broker_settings(
        provider,
        api_key_hash=hash_key(api_key),
        provider={"token_url": None, "authorize_url": None, "revocation_url": None, **change},
    )
    server = TestServer(create_app(settings))
    try:
        with pytest.raises(ConfigError) as caught:
            await server.start_server()
    finally:
        await server.close()
    assert caught.value.setting.startswith(setting)
    assert message in str(caught.value)


def test_serve_stops_with_a_message_naming_the_provider_when_discovery_fails(
    tmp_path: Path,
) -> None:
    closed = free_port()  # nothing listens there
    config = tmp_path / "broker.toml"
    config.write_text(
        f'host = "127.0.0.1"\nport = {free_port()}\n'
        f'[providers.idp]\nissuer = "http://127.0.0.1:{closed}"\nclient_id = "broker"\n'
    )
    finished = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert finished.returncode == 2
    assert (
        "broker: configuration error: providers.idp.issuer: discovery at "
        f"http://127.0.0.1:{closed}/.well-known/openid-configuration failed (connection_error)"
    ) in finished.stderr
    assert "Traceback" not in finished.stderr


async def introspect(
    browser: aiohttp.ClientSession, dev: DevProvider, token_value: str
) -> dict[str, Any]:
    """RFC 7662 at the provider, authenticated as the broker's client."""
    s = dev.settings
    pair = f"{quote_plus(s.client_id)}:{quote_plus(s.client_secret)}".encode()
    headers = {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    async with browser.post(
        dev.introspection_url, data={"token": token_value}, headers=headers
    ) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


def iso_plus(stamp: str, seconds: int) -> str:
    from datetime import datetime, timedelta

    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ") + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
