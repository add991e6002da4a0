"""Settings from TOML and BROKER_* variables: what is accepted, and errors that name the setting."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from broker.config import Settings, build_settings, load_settings, parse_encryption_keys
from broker.errors import ConfigError

KEY_1 = bytes(range(32))
KEY_2 = bytes(range(100, 132))
B64_1 = base64.b64encode(KEY_1).decode()
B64_2 = base64.b64encode(KEY_2).decode()
KEYS_ENV = {"BROKER_ENCRYPTION_KEYS": f"k1:{B64_1}"}
DIGEST = "ab" * 32

FULL_CONFIG = f"""
redis_url = "redis://:redis-pw-1234@cache.internal:6380/2"
port = 8443
public_url = "https://broker.example/"
redirect_allowlist = ["https://app.example/"]
key_prefix = "brk"
lock_ttl = 90
provider_timeout = 15

[providers.alfresco]
token_url = "https://idp.example/token"
authorize_url = "https://idp.example/authorize"
revocation_url = "https://idp.example/revoke"
client_id = "broker"
client_secret_env = "ALFRESCO_CLIENT_SECRET"
client_auth = "client_secret_post"
scopes = ["public_api", "offline"]
default_expires_in = 1800
pkce = false
refresh_token_max_age = 604800

[[clients]]
name = "billing"
key_sha256 = "{DIGEST.upper()}"
providers = ["alfresco"]
permissions = ["tokens:read"]

[[clients]]
name = "ops"
key_sha256 = "{"cd" * 32}"
providers = ["*"]
permissions = ["grants:read", "grants:write"]
"""


def provider(**extra: Any) -> dict[str, Any]:
    return {"token_url": "https://idp.example/token", "client_id": "broker", **extra}


def client(**extra: Any) -> dict[str, Any]:
    return {
        "name": "billing",
        "key_sha256": DIGEST,
        "providers": ["alfresco"],
        "permissions": ["tokens:read"],
        **extra,
    }


def config(**top: Any) -> dict[str, Any]:
    return {"providers": {"alfresco": provider()}, "clients": [client()], **top}


def build(raw: dict[str, Any], environ: dict[str, str] | None = None) -> Settings:
    return build_settings(raw, KEYS_ENV if environ is None else environ, base_dir=Path("/nowhere"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_config_file_is_read(tmp_path: Path) -> None:
    environ = {**KEYS_ENV, "ALFRESCO_CLIENT_SECRET": "cs-from-env"}
    settings = load_settings(write(tmp_path, FULL_CONFIG), environ)
    assert settings.redis_url == "redis://:redis-pw-1234@cache.internal:6380/2"
    assert not settings.is_memory_store
    assert (settings.port, settings.key_prefix, settings.lock_ttl) == (8443, "brk", 90.0)
    assert settings.public_url == "https://broker.example"
    assert settings.callback_url("alfresco") == "https://broker.example/oauth/alfresco/callback"
    assert settings.redirect_allowlist == ("https://app.example/",)
    assert settings.encryption_keys == (("k1", KEY_1),)
    assert not settings.ephemeral_encryption_key
    alfresco = settings.providers["alfresco"]
    assert alfresco.revocation_url == "https://idp.example/revoke"
    assert alfresco.client_secret is not None
    assert alfresco.client_secret.reveal() == "cs-from-env"
    assert alfresco.client_auth == "client_secret_post"
    assert alfresco.scopes == ("public_api", "offline")
    assert (alfresco.default_expires_in, alfresco.pkce) == (1800, False)
    assert alfresco.refresh_token_max_age == 604800
    billing, ops = settings.clients
    assert billing.key_sha256 == (DIGEST,)  # upper-case hex is normalised; one key is a list
    assert billing.may_use("alfresco")
    assert not billing.may_use("other")
    assert ops.may_use("other")
    assert ops.permissions == {"grants:read", "grants:write"}


def test_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    environ = {
        **KEYS_ENV,
        "ALFRESCO_CLIENT_SECRET": "cs",
        "BROKER_PORT": "9090",
        "BROKER_REDIS_URL": "redis://env-host:6379/1",
        "BROKER_REDIRECT_ALLOWLIST": "https://a.example/, https://b.example/",
    }
    settings = load_settings(write(tmp_path, FULL_CONFIG), environ)
    assert settings.port == 9090
    assert settings.redis_url == "redis://env-host:6379/1"
    assert settings.redirect_allowlist == ("https://a.example/", "https://b.example/")


def test_public_url_defaults_to_loopback_on_the_port() -> None:
    assert build(config(port=9001)).public_url == "http://127.0.0.1:9001"


BAD_SETTINGS = [
    (config(bogus=1), "bogus"),
    (config(providers={"alfresco": provider(bogus=1)}), "providers.alfresco.bogus"),
    (config(providers={"alfresco": {"client_id": "x"}}), "providers.alfresco.token_url"),
    (
        config(providers={"alfresco": provider(client_auth="private_key_jwt")}),
        "providers.alfresco.client_auth",
    ),
    (
        config(providers={"alfresco": provider(token_url="http://idp.example/token")}),
        "providers.alfresco.token_url",
    ),
    (config(clients=[client(providers=["nope"])]), "clients.billing.providers"),
    (config(clients=[client(key_sha256="abc123")]), "clients.billing.key_sha256"),
    (config(clients=[client(permissions=["tokens:write"])]), "clients.billing.permissions"),
    (config(clients=[client(), client(name="other")]), "clients.other.key_sha256"),
    (config(lock_ttl=0.1), "lock_ttl"),
    (config(redis_url="http://127.0.0.1:6379/0"), "redis_url"),
]


@pytest.mark.parametrize(("raw", "setting"), BAD_SETTINGS, ids=[s for _, s in BAD_SETTINGS])
def test_a_bad_setting_is_named_first_in_the_error(raw: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(raw)
    assert caught.value.setting == setting
    assert str(caught.value).startswith(f"{setting}: ")


def test_the_default_lock_outlasts_a_provider_call_and_the_rotated_write_window() -> None:
    s = build(config())
    assert s.lock_ttl >= s.provider_timeout + s.rotated_write_window + s.redis_timeout
    assert s.rotated_write_window >= 40  # Sentinel's default failure detection alone is 30 s


@pytest.mark.parametrize(
    ("changes", "setting", "problem"),
    [
        ({"lock_ttl": 30}, "lock_ttl", r"at least provider_timeout \+ rotated_write_window"),
        ({"provider_timeout": 30}, "lock_ttl", r"\(= 77\)"),
        ({"rotated_write_window": 120}, "lock_ttl", r"\(= 132\)"),
        (
            {"min_replicas_to_ack": 1, "replica_ack_timeout": 2, "redis_url": "redis://r"},
            "replica_ack_timeout",
            "shorter than redis_timeout",
        ),
        (
            {"redis_url": "redis+cluster://127.0.0.1:7000", "min_replicas_to_ack": 1},
            "min_replicas_to_ack",
            "not supported with redis\\+cluster",
        ),
    ],
)
def test_settings_that_are_only_safe_together_are_checked(
    changes: dict[str, Any], setting: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{setting}: .*{problem}"):
        build(config(**changes))


def test_a_bad_environment_value_is_named_by_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"^BROKER_PORT: must be a number"):
        build(config(), {**KEYS_ENV, "BROKER_PORT": "eighty"})


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("port", 8080.5, "must be a whole number"),
        ("BROKER_PORT", "8080.5", "must be a whole number"),
        ("lock_ttl", float("inf"), "must be a finite number"),
        ("BROKER_PROVIDER_TIMEOUT", "nan", "must be a finite number"),
        ("lock_ttl", [30], "must be a number"),
    ],
)
def test_numbers_must_be_finite_and_whole_where_counted(
    setting: str, value: Any, problem: str
) -> None:
    raw, env = (
        (config(), {setting: value}) if setting.isupper() else (config(**{setting: value}), {})
    )
    with pytest.raises(ConfigError, match=f"^{setting}: {problem}"):
        build(raw, {**KEYS_ENV, **env})


def test_numbers_in_the_environment_are_parsed() -> None:
    settings = build(config(), {**KEYS_ENV, "BROKER_PORT": "9091", "BROKER_LOCK_TTL": "75.5"})
    assert (settings.port, settings.lock_ttl) == (9091, 75.5)


def test_an_empty_encryption_keys_variable_is_an_error_not_a_throwaway_key() -> None:
    """A secret that rendered empty must not silently run on a key nobody else has."""
    with pytest.raises(ConfigError, match=r"^BROKER_ENCRYPTION_KEYS: no key given"):
        build(config(), {"BROKER_ENCRYPTION_KEYS": ""})


@pytest.mark.parametrize(
    "token_url", ["http://127.0.0.1:9000/token", "http://localhost/token", "http://[::1]/token"]
)
def test_plain_http_is_allowed_for_loopback_providers(token_url: str) -> None:
    settings = build(config(providers={"alfresco": provider(token_url=token_url)}))
    assert settings.providers["alfresco"].token_url == token_url


def test_plain_http_elsewhere_needs_allow_insecure_http() -> None:
    raw = config(
        providers={
            "alfresco": provider(token_url="http://idp:9000/token", allow_insecure_http=True)
        }
    )
    assert build(raw).providers["alfresco"].token_url == "http://idp:9000/token"


def test_invalid_toml_is_reported_against_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: .*not valid TOML"):
        load_settings(write(tmp_path, "port = \n"), KEYS_ENV)


def test_a_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"^config: file not found") as caught:
        load_settings(missing, KEYS_ENV)
    assert str(missing) in str(caught.value)


def test_client_secret_env_is_read_from_the_environment() -> None:
    raw = config(providers={"alfresco": provider(client_secret_env="ALF_SECRET")})
    secret = build(raw, {**KEYS_ENV, "ALF_SECRET": "s3cret"}).providers["alfresco"].client_secret
    assert secret is not None
    assert secret.reveal() == "s3cret"


def test_a_missing_client_secret_variable_is_named() -> None:
    raw = config(providers={"alfresco": provider(client_secret_env="ALF_SECRET")})
    with pytest.raises(ConfigError, match=r"^providers\.alfresco\.client_secret_env: .*ALF_SECRET"):
        build(raw)


def test_client_secret_file_is_relative_to_the_config_and_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "alfresco").write_text("  s3cret-from-file\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        tmp_path,
        '[providers.alfresco]\ntoken_url = "https://idp.example/token"\nclient_id = "b"\n'
        'client_secret_file = "secrets/alfresco"\n',
    )
    secret = load_settings(path, KEYS_ENV).providers["alfresco"].client_secret
    assert secret is not None
    assert secret.reveal() == "s3cret-from-file"


def test_two_sources_for_one_client_secret_are_refused() -> None:
    raw = config(providers={"alfresco": provider(client_secret="x", client_secret_env="ALF")})
    with pytest.raises(ConfigError) as caught:
        build(raw, {**KEYS_ENV, "ALF": "y"})
    assert caught.value.setting.startswith("providers.alfresco.client_secret")
    assert "client_secret, client_secret_env" in str(caught.value)


def test_a_redis_store_without_encryption_keys_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        build(config(redis_url="redis://127.0.0.1:6379/0"), {})
    assert caught.value.setting == "BROKER_ENCRYPTION_KEYS"


def test_the_memory_store_without_keys_gets_a_throwaway_key() -> None:
    settings = build(config(), {})
    assert settings.is_memory_store
    assert settings.ephemeral_encryption_key
    [(_, key)] = settings.encryption_keys
    assert len(key) == 32
    assert not build(config(), KEYS_ENV).ephemeral_encryption_key


def test_encryption_keys_are_parsed_in_order() -> None:
    assert parse_encryption_keys(f"k2:{B64_2}, k1:{B64_1}") == (("k2", KEY_2), ("k1", KEY_1))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"k1:{base64.b64encode(bytes(31)).decode()}", "must be 32 bytes"),
        ("k1:not*base64", "not valid base64"),
        (f"k1:{B64_1},k1:{B64_2}", "appears twice"),
        (B64_1, "'<id>:<base64"),
        ("", "no key given"),
    ],
    ids=["wrong-length", "bad-base64", "duplicate-id", "no-id", "empty"],
)
def test_bad_encryption_keys_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_encryption_keys(text)
    assert caught.value.setting == "BROKER_ENCRYPTION_KEYS"
    assert problem in str(caught.value)
    assert B64_1 not in str(caught.value)


def test_repr_shows_no_secret_password_or_key_material() -> None:
    raw = config(
        redis_url="redis://:redis-pw-1234@cache.internal:6379/0",
        providers={"alfresco": provider(client_secret="cs-inline-5678")},
    )
    settings = build(raw)
    for text in (repr(settings), str(settings), repr(settings.providers["alfresco"])):
        assert "cs-inline-5678" not in text
        assert "redis-pw-1234" not in text
        assert B64_1 not in text
        assert repr(KEY_1)[2:-1] not in text
        assert DIGEST not in text


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("redis://user:redis-pw@cache.internal:6380/2", "redis://user:***@cache.internal:6380/2"),
        ("rediss://:redis-pw@cache.internal/0", "rediss://:***@cache.internal/0"),
        ("redis://cache.internal:6379/0", "redis://cache.internal:6379/0"),
    ],
)
def test_redis_url_safe_masks_the_password(url: str, safe: str) -> None:
    assert Settings(redis_url=url).redis_url_safe == safe


def test_redis_url_safe_masks_a_password_given_as_a_query_parameter() -> None:
    safe = Settings(redis_url="redis://cache.internal:6379/0?password=redis-pw").redis_url_safe
    assert "redis-pw" not in safe


def test_redis_url_safe_keeps_an_ipv6_host_bracketed() -> None:
    assert Settings(redis_url="redis://:pw@[::1]:6379/0").redis_url_safe == (
        "redis://:***@[::1]:6379/0"
    )


def test_authorization_flow_settings_are_read() -> None:
    raw = config(
        authorization_ttl=300,
        redirect_allowlist=["https://app.example/done"],
        providers={
            "alfresco": provider(
                redirect_allowlist=["https://other.example/"], required_scopes=["offline_access"]
            )
        },
    )
    settings = build(raw)
    assert settings.authorization_ttl == 300
    alfresco = settings.providers["alfresco"]
    assert alfresco.redirect_allowlist == ("https://other.example/",)
    assert alfresco.required_scopes == ("offline_access",)
    assert not alfresco.discovers
    assert build(config()).authorization_ttl == 600
    assert build(config(), {**KEYS_ENV, "BROKER_AUTHORIZATION_TTL": "120"}).authorization_ttl == 120


@pytest.mark.parametrize(
    ("table", "metadata_url"),
    [
        ({"issuer": "https://login.example/realms/a/"}, "https://login.example/realms/a/.well-known/openid-configuration"),
        ({"discovery_url": "https://login.example/meta"}, "https://login.example/meta"),
    ],
)  # fmt: skip
def test_a_discovered_provider_needs_no_token_url(table: dict[str, str], metadata_url: str) -> None:
    settings = build(config(providers={"alfresco": {"client_id": "broker", **table}}))
    alfresco = settings.providers["alfresco"]
    assert alfresco.discovers
    assert alfresco.token_url == ""  # filled at start-up
    assert alfresco.metadata_url == metadata_url


BAD_FLOW_SETTINGS = [
    (config(authorization_ttl=30), "authorization_ttl"),
    (config(authorization_ttl=7200), "authorization_ttl"),
    (config(redirect_allowlist=["https://user@app.example/"]), "redirect_allowlist"),
    (config(redirect_allowlist=["https://app.example/?next=1"]), "redirect_allowlist"),
    (config(redirect_allowlist=["app.example/"]), "redirect_allowlist"),
    (
        config(providers={"alfresco": provider(redirect_allowlist=["https://a.example/#x"])}),
        "providers.alfresco.redirect_allowlist",
    ),
    (
        config(providers={"alfresco": provider(required_scopes="offline_access")}),
        "providers.alfresco.required_scopes",
    ),
    (
        config(providers={"alfresco": {"client_id": "b", "issuer": "http://idp.example/"}}),
        "providers.alfresco.issuer",
    ),
    (
        config(providers={"alfresco": {"client_id": "b", "discovery_url": "idp.example"}}),
        "providers.alfresco.discovery_url",
    ),
]


@pytest.mark.parametrize(
    ("raw", "setting"),
    BAD_FLOW_SETTINGS,
    ids=[f"{s}-{i}" for i, (_, s) in enumerate(BAD_FLOW_SETTINGS)],
)
def test_a_bad_authorization_setting_is_named(raw: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(raw)
    assert caught.value.setting == setting


def test_a_bad_range_from_the_environment_is_named_by_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"^BROKER_PORT: must be at most 65535"):
        build(config(), {**KEYS_ENV, "BROKER_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"^BROKER_REDIRECT_ALLOWLIST: .*no user info"):
        build(config(), {**KEYS_ENV, "BROKER_REDIRECT_ALLOWLIST": "https://u@app.example/"})


def test_an_unknown_setting_is_named_before_the_problems_it_causes() -> None:
    raw = config(
        providers={"alfresco": {"token_url": "https://idp.example/token", "clientid": "b"}}
    )
    with pytest.raises(ConfigError, match=r"^providers\.alfresco\.clientid: unknown setting"):
        build(raw)


def test_a_client_without_a_name_is_named_by_its_position() -> None:
    with pytest.raises(ConfigError, match=r"^clients\[1\]\.name: required"):
        build(config(clients=[client(), {"key_sha256": "cd" * 32}]))


@pytest.mark.parametrize(
    "raw",
    [
        config(encryption_keys=[]),
        config(ephemeral_encryption_key=True),
        config(providers={"alfresco": provider(name="other")}),
    ],
    ids=["encryption_keys", "ephemeral_encryption_key", "provider-name"],
)
def test_values_derived_at_load_time_cannot_be_configured(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting$"):
        build(raw)


def test_encryption_keys_file_may_come_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"k1:{B64_1}\n", encoding="utf-8")
    environ = {"BROKER_ENCRYPTION_KEYS_FILE": "keys"}
    settings = build_settings(config(redis_url="redis://r"), environ, base_dir=tmp_path)
    assert settings.encryption_keys == (("k1", KEY_1),)
    with pytest.raises(ConfigError, match=r"^BROKER_ENCRYPTION_KEYS_FILE: cannot read"):
        build_settings(config(), {"BROKER_ENCRYPTION_KEYS_FILE": "absent"}, base_dir=tmp_path)


def test_log_level_is_case_insensitive() -> None:
    assert build(config(log_level="WARNING")).log_level == "warning"


def test_settings_made_in_code_never_read_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKER_PORT", "9999")
    assert Settings().port == 8080
    assert build(config()).port == 8080  # only the environment given to build_settings counts
