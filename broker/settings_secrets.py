"""Secrets that settings reference rather than hold: the encryption keys (a variable or a
file), the providers' client secrets (``client_secret_env`` / ``client_secret_file``) and the
webhooks' signing secrets (``secret_env`` / ``secret_file``).

They are read once, after the settings validated, and each problem names the setting (or the
variable) that pointed at them.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from broker.errors import ConfigError
from broker.settings_model import Settings
from broker.settings_providers import ProviderSettings
from broker.settings_types import KEY_ID, Secret
from broker.settings_webhooks import WebhookSettings, parse_secret

KeyRing = tuple[tuple[str, bytes], ...]


def parse_encryption_keys(text: str, setting: str = "BROKER_ENCRYPTION_KEYS") -> KeyRing:
    """Parse ``"k2:<base64 32 bytes>,k1:<base64>"``; the first key encrypts new writes."""
    keys: list[tuple[str, bytes]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kid, sep, material = item.partition(":")
        if not sep or not KEY_ID.match(kid):
            raise ConfigError(setting, "each key must be '<id>:<base64 of 32 bytes>'")
        try:
            key = base64.b64decode(material, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ConfigError(setting, f"key {kid!r} is not valid base64") from err
        if len(key) != 32:
            raise ConfigError(setting, f"key {kid!r} must be 32 bytes, not {len(key)}")
        if any(kid == seen for seen, _ in keys):
            raise ConfigError(setting, f"key id {kid!r} appears twice")
        keys.append((kid, key))
    if not keys:
        raise ConfigError(setting, "no key given")
    return tuple(keys)


def encryption_keys(
    settings: Settings, environ: Mapping[str, str], base_dir: Path, file_setting: str
) -> tuple[KeyRing, bool]:
    """The key ring, and whether it is a throwaway key (memory store, no key configured)."""
    env_name = settings.encryption_keys_env
    if env_name in environ:  # set but empty is a mistake (a missing secret key), not "none"
        return parse_encryption_keys(environ[env_name], env_name), False
    if settings.encryption_keys_file is not None:
        text = read_secret_file(file_setting, settings.encryption_keys_file, base_dir)
        return parse_encryption_keys(text, file_setting), False
    if settings.is_memory_store:
        return (("ephemeral", os.urandom(32)),), True
    raise ConfigError(env_name, "required with a Redis store (make one with `broker keygen`)")


def client_secrets(
    providers: Mapping[str, ProviderSettings], environ: Mapping[str, str], base_dir: Path
) -> dict[str, ProviderSettings]:
    """The providers with each referenced client secret read into ``client_secret``."""
    result = {}
    for name, provider in providers.items():
        where = f"providers.{name}"
        secret = provider.client_secret
        if provider.client_secret_env is not None:
            variable = provider.client_secret_env
            if not environ.get(variable):
                raise ConfigError(
                    f"{where}.client_secret_env", f"environment variable {variable} is not set"
                )
            secret = Secret(environ[variable])
        elif provider.client_secret_file is not None:
            path = provider.client_secret_file
            secret = Secret(read_secret_file(f"{where}.client_secret_file", path, base_dir))
        result[name] = provider.model_copy(
            update={"client_secret": secret, "client_secret_env": None, "client_secret_file": None}
        )
    return result


def webhook_secrets(
    webhooks: Sequence[WebhookSettings], environ: Mapping[str, str], base_dir: Path
) -> tuple[WebhookSettings, ...]:
    """The webhooks with each referenced signing secret read (and checked) into ``secret``."""
    result = []
    for hook in webhooks:
        where = f"webhooks.{hook.label}"
        if hook.secret_env is not None:
            setting, text = f"{where}.secret_env", environ.get(hook.secret_env, "")
            if not text:
                raise ConfigError(setting, f"environment variable {hook.secret_env} is not set")
        elif hook.secret_file is not None:
            setting = f"{where}.secret_file"
            text = read_secret_file(setting, hook.secret_file, base_dir)
        else:
            result.append(hook)  # inline, checked by the model
            continue
        try:
            parse_secret(text)
        except ValueError as err:
            raise ConfigError(setting, str(err)) from None
        update = {"secret": Secret(text), "secret_env": None, "secret_file": None}
        result.append(hook.model_copy(update=update))
    return tuple(result)


def read_secret_file(name: str, value: str, base_dir: Path) -> str:
    """The stripped text of a secret file (relative to ``base_dir``); never empty."""
    path = base_dir / value
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(name, f"cannot read {path}: {err.strerror}") from err
    if not text:
        raise ConfigError(name, f"{path} is empty")
    return text
