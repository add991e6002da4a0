"""App keys and request/answer helpers for all handler modules: they import this, not each other."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web
from pydantic import BaseModel

from broker.app_schedule import AppTokenScheduler
from broker.apptokens import AppTokenService
from broker.authorize import AuthorizationService
from broker.config import Settings
from broker.crypto import KeyRing
from broker.errors import InvalidRequest
from broker.grants import GrantService
from broker.metrics import Metrics
from broker.models import iso, validate_user_id
from broker.providers import ProviderRegistry
from broker.refresh import Refresher
from broker.scheduler import Scheduler
from broker.store import GrantStore

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
KEYRING = web.AppKey("keyring", KeyRing)
STORE = web.AppKey("store", GrantStore)
REFRESHER = web.AppKey("refresher", Refresher)
PROVIDERS = web.AppKey("providers", ProviderRegistry)
GRANTS = web.AppKey("grants", GrantService)
STOPPING = web.AppKey("stopping", asyncio.Event)
SCHEDULER = web.AppKey("scheduler", Scheduler)
AUTHORIZATIONS = web.AppKey("authorizations", AuthorizationService)
APP_TOKENS = web.AppKey("app_tokens", AppTokenService)
APP_SCHEDULER = web.AppKey("app_scheduler", AppTokenScheduler)

BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def grant_path(request: web.Request, trailing: int = 0) -> tuple[str, str]:
    """(provider, user id) from the raw path: the user id is the last segment but ``trailing``
    fixed ones, percent-decoded strictly here because aiohttp leaves invalid UTF-8 escapes such
    as ``%FF`` undecoded, which would make two different inputs name one grant."""
    provider = request.match_info["provider"]
    segment = request.raw_path.partition("?")[0].rsplit("/", 1 + trailing)[-1 - trailing]
    if BAD_PERCENT.search(segment):
        raise InvalidRequest("user id has a malformed percent-escape")
    try:
        user_id = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("user id is not valid UTF-8") from None
    return provider, validate_user_id(user_id)


def now(request: web.Request) -> float:
    return request.app[REFRESHER].clock()


def iso_of(ts: float) -> str:
    text = iso(ts)
    assert text is not None
    return text


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,7}", raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def json_answer(
    model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = NO_STORE
) -> web.Response:
    """A JSON answer from its model, unset optional fields left out. ``json.dumps``, not
    pydantic's serializer, which refuses lone surrogates: a token a provider sent with an
    escaped one is handed out as it came, as it always was."""
    return web.Response(
        text=json.dumps(model.model_dump(exclude_unset=True)),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise InvalidRequest("send the body as application/json")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body
