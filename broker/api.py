"""HTTP handlers and routes: parse and check input, call a service, shape the answer."""

from __future__ import annotations

import asyncio
import html
import json
import re
from importlib import resources
from typing import Any
from urllib.parse import unquote_to_bytes

import structlog
from aiohttp import web

from broker.auth import authorize
from broker.authorize import AuthorizationService
from broker.config import Settings
from broker.crypto import KeyRing
from broker.errors import BrokerError, InvalidRequest, InvalidState, ProviderNotFound, Unavailable
from broker.grants import GrantImport, GrantService
from broker.metrics import Metrics
from broker.middlewares import client_of
from broker.models import MAX_SCOPE_CHARS, MAX_TOKEN_CHARS, iso, validate_user_id
from broker.refresh import Refresher
from broker.scheduler import Scheduler
from broker.store import GrantStore

audit = structlog.get_logger("broker.audit")
log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
KEYRING = web.AppKey("keyring", KeyRing)
STORE = web.AppKey("store", GrantStore)
REFRESHER = web.AppKey("refresher", Refresher)
GRANTS = web.AppKey("grants", GrantService)
STOPPING = web.AppKey("stopping", asyncio.Event)
SCHEDULER = web.AppKey("scheduler", Scheduler)
AUTHORIZATIONS = web.AppKey("authorizations", AuthorizationService)

MAX_EXPIRES_IN = 366 * 86400
BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# The browser-facing callback: nothing cached, no referrer (its URL held a code), no framing,
# no subresources, no cookies.
BROWSER = {
    **NO_STORE,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
}


def grant_path(request: web.Request) -> tuple[str, str]:
    """(provider, user id) from the raw path: the user id is the last segment, percent-decoded
    strictly here because aiohttp leaves invalid UTF-8 escapes such as ``%FF`` undecoded, which
    would make two different inputs name one grant."""
    provider = request.match_info["provider"]
    segment = request.raw_path.partition("?")[0].rsplit("/", 1)[-1]
    if BAD_PERCENT.search(segment):
        raise InvalidRequest("user id has a malformed percent-escape")
    try:
        user_id = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("user id is not valid UTF-8") from None
    return provider, validate_user_id(user_id)


async def get_token(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    client = client_of(request)
    authorize(client, "tokens:read", provider)
    settings = request.app[SETTINGS]
    min_ttl = _int_query(request, "min_ttl", settings.default_min_ttl, 0, settings.max_min_ttl)
    grant = await request.app[REFRESHER].token(provider, user_id, min_ttl)
    assert grant.access_token is not None
    assert grant.access_expires_at is not None
    request.app[METRICS].token_handouts.labels(provider, client.name).inc()
    audit.info("token.handout", client=client.name, provider=provider, user_id=user_id)
    now = _now(request)
    body = {
        "access_token": grant.access_token,
        "token_type": grant.token_type,
        "expires_at": iso(grant.access_expires_at),
        "expires_in": max(0, int(grant.access_expires_at - now)),
        "scope": grant.scope,
    }
    return web.json_response(body, headers=NO_STORE)


async def put_grant(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    authorize(client_of(request), "grants:write", provider)
    request.app[REFRESHER].provider(provider)
    body = _grant_import(await _json_object(request))
    grant, created = await request.app[GRANTS].import_grant(provider, user_id, body)
    return web.json_response(grant.status(), status=201 if created else 200, headers=NO_STORE)


async def get_grant(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    authorize(client_of(request), "grants:read", provider)
    grant = await request.app[GRANTS].status(provider, user_id)
    return web.json_response(grant.status(), headers=NO_STORE)


async def delete_grant(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    authorize(client_of(request), "grants:write", provider)
    outcome = await request.app[GRANTS].delete(provider, user_id)
    return web.Response(status=204, headers={"Broker-Revocation": outcome})


async def start_authorization(request: web.Request) -> web.Response:
    provider = request.match_info["provider"]
    authorize(client_of(request), "grants:write", provider)
    request.app[REFRESHER].provider(provider)
    user_id, redirect_after, scope = _authorization_request(await _json_object(request))
    started = await request.app[AUTHORIZATIONS].start(provider, user_id, redirect_after, scope)
    body = {
        "authorization_url": started.authorization_url,
        "state": started.state,
        "expires_at": iso(started.expires_at),
    }
    return web.json_response(body, status=201, headers=NO_STORE)


async def oauth_callback(request: web.Request) -> web.Response:
    """The user's browser, back from the provider: a redirect to ``redirect_after``, or a
    small HTML page saying what happened when there is nowhere trustworthy to send it."""
    provider = request.match_info["provider"]
    try:
        result = await request.app[AUTHORIZATIONS].complete(provider, request.query)
    except BrokerError as err:
        return _callback_page(request, err)
    except Exception:
        log.exception("authorization.callback_failed", provider=provider)
        return _callback_page(request, BrokerError())
    return web.Response(status=302, headers={**BROWSER, "Location": result.location})


def _callback_page(request: web.Request, err: BrokerError) -> web.Response:
    minutes = max(1, request.app[SETTINGS].authorization_ttl // 60)
    headers = dict(BROWSER)
    if isinstance(err, InvalidState):
        status, title = 400, "This sign-in link cannot be used"
        text = (
            f"It is unknown, has expired (links are valid for {minutes} minutes) or was already "
            "used. Nothing was connected and no account was changed."
        )
        todo = "Go back to the application and start connecting your account again."
    elif isinstance(err, ProviderNotFound):
        status, title = 404, "Unknown service"
        text = "This address does not belong to a service this broker connects accounts to."
        todo = "Go back to the application and start connecting your account again."
    elif isinstance(err, Unavailable):
        status, title = 503, "Temporarily unavailable"
        text = "Your sign-in could not be checked just now. Nothing was connected."
        todo = "Reload this page in a moment; if that keeps failing, start again from the app."
        headers["Retry-After"] = str(err.retry_after)
    else:
        status, title = 500, "Something went wrong"
        text = "Your account could not be connected because of an error on our side."
        todo = "Start again from the application; if it keeps failing, tell its support team."
    request_id = structlog.contextvars.get_contextvars().get("request_id", "")
    page = _PAGE.format(
        title=html.escape(title),
        text=html.escape(text),
        todo=html.escape(todo),
        reference=html.escape(str(request_id)),
    )
    return web.Response(
        status=status, text=page, content_type="text/html", charset="utf-8", headers=headers
    )


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;
line-height:1.5;color:#222}}small{{color:#666}}</style>
</head>
<body>
<h1>{title}</h1>
<p>{text}</p>
<p>{todo}</p>
<p><small>Reference: {reference}</small></p>
</body>
</html>
"""


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, dict[str, Any]] = {}
    try:
        latency = await request.app[STORE].ping()
        checks["redis"] = {"ok": True, "latency_ms": round(latency, 2)}
    except BrokerError as err:
        checks["redis"] = {"ok": False, "detail": err.detail}
    checks["encryption_keys"] = {"ok": True, "keys": len(request.app[KEYRING].key_ids)}
    if SCHEDULER in request.app:
        scheduler = request.app[SCHEDULER]
        checks["scheduler"] = {"ok": scheduler.running, "lag_seconds": round(scheduler.lag, 3)}
    if request.app[STOPPING].is_set():
        checks["shutdown"] = {"ok": False, "detail": "shutting down"}
    ready = all(check["ok"] for check in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


_OPENAPI = resources.files("broker").joinpath("openapi.json")


async def openapi(_: web.Request) -> web.Response:
    return web.Response(body=_OPENAPI.read_bytes(), content_type="application/json")


def add_routes(app: web.Application) -> None:
    grant = r"/v1/grants/{provider:[^/]+}/{user_id:[^/]*}"
    app.router.add_get(r"/v1/tokens/{provider:[^/]+}/{user_id:[^/]*}", get_token, allow_head=False)
    app.router.add_put(grant, put_grant)
    app.router.add_get(grant, get_grant, allow_head=False)
    app.router.add_delete(grant, delete_grant)
    app.router.add_post(r"/v1/authorizations/{provider:[^/]+}", start_authorization)
    app.router.add_get(r"/oauth/{provider:[^/]+}/callback", oauth_callback, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)


def _now(request: web.Request) -> float:
    return request.app[REFRESHER].clock()


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,7}", raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise InvalidRequest("send the body as application/json")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def _authorization_request(body: dict[str, Any]) -> tuple[str, str, str | None]:
    unknown = set(body) - {"user_id", "redirect_after", "scope"}
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    user_id = body.get("user_id")
    if not isinstance(user_id, str):
        raise InvalidRequest("user_id is required: a string")
    redirect_after = body.get("redirect_after")
    if not isinstance(redirect_after, str) or not redirect_after:
        raise InvalidRequest("redirect_after is required: a URL in the redirect allow-list")
    scope = body.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise InvalidRequest("scope must be a string")
    return validate_user_id(user_id), redirect_after, scope


def _grant_import(body: dict[str, Any]) -> GrantImport:
    unknown = set(body) - {"refresh_token", "access_token", "expires_in", "scope"}
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    refresh = body.get("refresh_token")
    if not isinstance(refresh, str) or not refresh or len(refresh) > MAX_TOKEN_CHARS:
        raise InvalidRequest("refresh_token is required: a non-empty string")
    access = body.get("access_token")
    if access is not None and (
        not isinstance(access, str) or not access or len(access) > MAX_TOKEN_CHARS
    ):
        raise InvalidRequest("access_token must be a non-empty string")
    expires_in = body.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int)
        or not 1 <= expires_in <= MAX_EXPIRES_IN
    ):
        raise InvalidRequest(f"expires_in must be an integer from 1 to {MAX_EXPIRES_IN}")
    if expires_in is not None and access is None:
        raise InvalidRequest("expires_in describes an access_token; send both or neither")
    scope = body.get("scope")
    if scope is not None and (not isinstance(scope, str) or len(scope) > MAX_SCOPE_CHARS):
        raise InvalidRequest("scope must be a string")
    return GrantImport(
        refresh_token=refresh, access_token=access, expires_in=expires_in, scope=scope
    )
