"""The one definition of broker's settings: :class:`Settings` (the top level of broker.toml),
with :class:`~broker.settings_providers.ProviderSettings` and
:class:`~broker.settings_providers.ClientSettings` for its tables.

Everything else is generated from these models: validation and its error messages
(``broker.config``), the ``BROKER_<NAME>`` environment variables, ``broker config-schema``, the
settings tables of docs/configuration.md and the ``config`` and ``providers`` parts of the Helm
chart's values.schema.json (``python -m broker.settings_docs``).

To add a setting, add one field to the model it belongs to (a top-level one to its topic's
class in :mod:`broker.settings_groups`), with its type (``Count`` for whole
numbers, ``Number`` for seconds), its default, its constraints (``ge``, ``le``, ``gt``, a
``Check``) and a ``description`` (the documentation's "meaning"); rules that involve several
settings go in :mod:`broker.settings_rules`, raising ``setting_error(name, problem)``. Then run
``python -m broker.settings_docs`` to regenerate the documentation and the chart's schema
(tests/test_settings_generated.py fails until you do). Nothing else is written by hand; only a
new ``[[clients]]`` setting also needs the Helm chart, which passes a client's keys by name (its
``clients`` schema and the clients.toml template).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from broker.settings_groups import ConnectionSettings, RefreshSettings, ServiceSettings
from broker.settings_layers import layers
from broker.settings_providers import ClientSettings, ProviderSettings
from broker.settings_rules import check_together
from broker.settings_types import (
    MEMORY_URL,
    PROVIDER_NAME,
    Derived,
    matching,
    setting_error,
    without_password,
)
from broker.settings_webhooks import WebhookSettings

ProviderName = Annotated[str, matching(PROVIDER_NAME, "name must match [a-z0-9][a-z0-9_-]{0,62}")]


# The settings of each topic live in broker.settings_groups; fields come base class first, so
# the bases are listed last topic first. The tables and the rules that join settings, here.
class Settings(BaseSettings, RefreshSettings, ConnectionSettings, ServiceSettings):
    """broker.toml; each top-level setting may also come from the variable BROKER_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", frozen=True, extra="forbid")

    providers: Mapping[ProviderName, ProviderSettings] = Field(
        default_factory=dict, description="the `[providers.<name>]` tables"
    )
    clients: tuple[ClientSettings, ...] = Field(default=(), description="the `[[clients]]` tables")
    webhooks: tuple[WebhookSettings, ...] = Field(
        default=(), description="the `[[webhooks]]` tables (docs/webhooks.md)"
    )
    # Derived at load time (broker.config): the key ring, and whether it is a throwaway key.
    encryption_keys: Derived[tuple[tuple[str, bytes], ...]] = Field(
        default=(), repr=False, exclude=True
    )
    ephemeral_encryption_key: Derived[bool] = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor arguments, then (while ``build_settings`` loads) its layers: the given
        environment's ``BROKER_*`` over the TOML document; never the process's environment."""
        return (init_settings, *layers())

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str, info: ValidationInfo) -> str:
        if not value and "port" in info.data:
            value = f"http://127.0.0.1:{info.data['port']}"
        return value.rstrip("/")

    @field_validator("providers", mode="before")
    @classmethod
    def _provider_names(cls, value: Any) -> Any:
        """Each ``[providers.<name>]`` table gets its name from the table's key."""
        if not isinstance(value, Mapping):
            return value
        named = {}
        for key, table in value.items():
            if isinstance(table, Mapping):
                if "name" in table:
                    raise setting_error(f"{key}.name", "unknown setting")
                table = {**table, "name": key}
            named[key] = table
        return named

    @model_validator(mode="after")
    def _together(self) -> Self:
        check_together(self)
        return self

    @property
    def redis_url_safe(self) -> str:
        """The Redis URL without its password, for logs and ``check-config``."""
        return without_password(self.redis_url)

    @property
    def is_memory_store(self) -> bool:
        return self.redis_url == MEMORY_URL

    def callback_url(self, provider: str) -> str:
        return f"{self.public_url}/oauth/{provider}/callback"
