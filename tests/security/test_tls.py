"""Calls to providers over real TLS on loopback: certificates are always verified, and
``ca_bundle`` is how a private CA is trusted. A provider whose certificate is not trusted is a
transient failure: nothing is sent to it, and the stored grant is kept."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

import broker
from broker.app import create_app
from broker.config import build_settings
from broker.devprovider import DevProvider, DevProviderSettings
from broker.errors import ConfigError
from tests.conftest import (
    SECRETS,
    BrokerFactory,
    Clock,
    RedisServer,
    broker_settings,
    encryption_key,
)
from tests.security.certs import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def provider(pki: Pki) -> AsyncIterator[DevProvider]:
    """The dev provider served over HTTPS with a certificate from the throwaway CA (this
    replaces the plain-http ``provider`` of tests/conftest.py in this module)."""
    dev = DevProvider(DevProviderSettings(client_secret="cs-" + uuid.uuid4().hex))
    await dev.start(ssl_context=pki.server_context())
    yield dev
    await dev.close()
    SECRETS.update(dev.secrets())


async def test_an_untrusted_provider_fails_cleanly_and_the_ca_bundle_fixes_it(
    make_broker: BrokerFactory,
    provider: DevProvider,
    pki: Pki,
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    assert provider.token_url.startswith("https://127.0.0.1:")
    clock = Clock()
    shared = {
        "redis_url": redis_server.url,
        "key_prefix": key_prefix,
        "encryption_keys": encryption_key(),
    }
    untrusting = await make_broker(clock, **shared)
    refresh_token = provider.issue_refresh_token("u")
    status, _ = await untrusting.import_grant(
        "u", refresh_token=refresh_token, access_token="at-imported", expires_in=600
    )
    assert status == 201
    clock.advance(3600)

    status, body = await untrusting.token("u")
    assert (status, body["code"]) == (503, "upstream_unavailable")
    assert "tls_error" in body["detail"]
    assert refresh_token not in str(body)
    assert provider.token_requests == 0  # the handshake failed: the token was never sent
    status, grant = await untrusting.grant("u")
    assert status == 200
    assert (grant["state"], grant["last_error"]) == ("refresh_failing", "tls_error")

    # Import without an access token validates at the provider: refused, nothing stored.
    other = provider.issue_refresh_token("v")
    status, body = await untrusting.import_grant("v", refresh_token=other)
    assert (status, body["code"]) == (503, "upstream_unavailable")
    assert (await untrusting.grant("v"))[0] == 404

    trusting = await make_broker(clock, ca_bundle=str(pki.ca_pem), **shared)
    status, token = await trusting.token("u")
    assert status == 200, token
    assert token["access_token"] != "at-imported"
    assert provider.refresh_requests == 1
    status, grant = await trusting.grant("u")
    assert (grant["state"], grant["last_error"]) == ("active", None)
    assert (await trusting.import_grant("v", refresh_token=other))[0] == 201


async def test_discovery_from_an_untrusted_issuer_stops_start_up(
    make_broker: BrokerFactory, provider: DevProvider, pki: Pki
) -> None:
    discovered = {"issuer": provider.issuer, "token_url": None, "revocation_url": None}
    settings = broker_settings(provider, api_key_hash="0" * 64, provider=discovered)
    runner = web.AppRunner(create_app(settings))
    with pytest.raises(ConfigError) as caught:
        await runner.setup()  # start-up: the cleanup contexts run, discovery among them
    await runner.cleanup()
    assert caught.value.setting == "providers.dev.issuer"
    assert "tls_error" in str(caught.value)
    trusting = await make_broker(provider=discovered, ca_bundle=str(pki.ca_pem))
    refresh_token = provider.issue_refresh_token("u")
    assert (await trusting.import_grant("u", refresh_token=refresh_token))[0] == 201


def settings_with(environ: dict[str, str], base_dir: Path, **raw: object) -> None:
    build_settings(raw, {"BROKER_ENCRYPTION_KEYS": encryption_key(), **environ}, base_dir)


def test_the_ca_bundle_must_load_and_errors_name_the_setting(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"^ca_bundle: cannot read .*missing\.pem"):
        settings_with({}, tmp_path, ca_bundle="missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^ca_bundle: .*junk\.pem holds no usable PEM CA"):
        settings_with({}, tmp_path, ca_bundle="junk.pem")
    with pytest.raises(ConfigError, match=r"^BROKER_CA_BUNDLE: cannot read"):
        settings_with({"BROKER_CA_BUNDLE": "/nonexistent/ca.pem"}, tmp_path)


def test_a_relative_ca_bundle_is_relative_to_the_config_file(tmp_path: Path, pki: Pki) -> None:
    settings = build_settings(
        {"ca_bundle": "pki/ca.pem"}, {"BROKER_ENCRYPTION_KEYS": encryption_key()}, tmp_path
    )
    assert settings.ca_bundle == str(pki.ca_pem.resolve())


def test_nothing_in_broker_turns_certificate_checks_off() -> None:
    """A guard for later changes: no switch, flag or shortcut disables verification."""
    off = ("ssl=False", "CERT_NONE", "check_hostname = False", "verify_ssl", "_create_unverified")
    found = [
        f"{source.name}: {pattern}"
        for source in Path(broker.__file__).parent.rglob("*.py")
        for pattern in off
        if pattern in source.read_text(encoding="utf-8")
    ]
    assert found == []
