"""The ``[[webhooks]]`` tables: receivers of grant events (docs/webhooks.md).

A receiver's signing secret is Standard Webhooks' ``whsec_<base64>``; like a provider's client
secret it is referenced (``secret_env``, ``secret_file``) and only inline (``secret``) for
development. Referenced secrets are read at load time (``broker.settings_secrets``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Annotated, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.settings_types import (
    Check,
    Count,
    Flag,
    HttpUrl,
    Number,
    Secret,
    SecretText,
    ShownDefault,
    Text,
    insecure_url_problem,
    matching,
    setting_error,
)

EventType = Literal[
    "grant.connected",
    "grant.refresh_failing",
    "grant.recovered",
    "grant.reauth_required",
    "grant.refresh_token_expiring",
    "grant.deleted",
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
SECRET_PREFIX = "whsec_"
SECRET_SOURCES = ("secret", "secret_env", "secret_file")
WEBHOOK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MIN_SECRET_BYTES = 16  # Standard Webhooks asks for 24..64; shorter is guessable


def parse_secret(text: str) -> bytes:
    """The key bytes of ``whsec_<base64>``; ValueError naming the problem (never the text)."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"must be '{SECRET_PREFIX}<base64>'")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"must be '{SECRET_PREFIX}<base64>': not valid base64") from err
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"must hold at least {MIN_SECRET_BYTES} bytes, not {len(key)}")
    return key


def _webhook_secret(value: Secret) -> Secret:
    parse_secret(value.reveal())
    return value


WebhookSecret = Annotated[SecretText, Check(_webhook_secret)]


class WebhookSettings(BaseModel):
    """A [[webhooks]] table: a receiver of grant events, signed as Standard Webhooks do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: HttpUrl = Field(description="where events are POSTed")
    name: Annotated[
        str | None,
        matching(WEBHOOK_NAME, "must match [a-z0-9][a-z0-9_-]{0,62}"),
        ShownDefault("the URL's host"),
    ] = Field(
        default=None,
        description="names the receiver in metrics and logs, and its consumer group "
        "(`webhook:<name>`): keep it when the URL moves and undelivered events follow",
    )
    secret: WebhookSecret | None = Field(
        default=None, description="the signing secret itself, inline: for development only"
    )
    secret_env: Text | None = Field(
        default=None,
        description="the environment variable holding the signing secret (`whsec_<base64>`)",
    )
    secret_file: Text | None = Field(
        default=None,
        description="a file holding the signing secret (a mounted secret); relative paths are "
        "relative to the config file",
    )
    events: tuple[EventType, ...] = Field(
        default=EVENT_TYPES, min_length=1, description="the event types delivered"
    )
    providers: tuple[Text, ...] = Field(
        default=("*",), min_length=1, description='provider names whose events go here, or `["*"]`'
    )
    timeout: Number = Field(
        default=5.0,
        gt=0,
        le=30,
        description="seconds one delivery attempt may take (connect to response); a failed "
        "attempt is retried after `timeout` + 1 seconds, then twice as long each time up to an "
        "hour, for 24 hours",
    )
    max_concurrency: Count = Field(
        default=4, ge=1, le=64, description="deliveries in flight to this receiver per replica"
    )
    allow_insecure_http: Flag = Field(
        default=False,
        description="allow a plain `http` URL to a host that is not loopback",
    )

    @property
    def label(self) -> str:
        """The receiver's name, by default its URL's host (never a path or query: they may hold
        a credential)."""
        return self.name or (urlsplit(self.url).hostname or "webhook").replace(".", "-")

    def wants(self, event_type: str, provider: str) -> bool:
        return event_type in self.events and ("*" in self.providers or provider in self.providers)

    def key(self) -> bytes:
        """The signing key; settings hold a validated secret once loaded."""
        if self.secret is None:
            raise ValueError(f"webhook {self.label} has no secret loaded")
        return parse_secret(self.secret.reveal())

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        problem = insecure_url_problem(self.url, self.allow_insecure_http)
        if problem:
            raise setting_error("url", problem)
        given = [key for key in SECRET_SOURCES if getattr(self, key) is not None]
        if len(given) > 1:
            raise setting_error(given[1], f"give only one of {', '.join(given)}")
        if not given:
            raise setting_error("secret_env", "required (or secret_file, or secret)")
        return self


def check_webhooks(webhooks: Sequence[WebhookSettings], providers: Sequence[str]) -> None:
    """Receivers name configured providers, and no name is used twice (it names a consumer
    group: two receivers sharing one would each get part of the events)."""
    names: set[str] = set()
    for hook in webhooks:
        where = f"webhooks.{hook.label}"
        for provider in hook.providers:
            if provider != "*" and provider not in providers:
                raise setting_error(f"{where}.providers", f"unknown provider {provider!r}")
        if hook.label in names:
            raise setting_error(f"{where}.name", "two webhooks have this name: set `name`")
        names.add(hook.label)
