"""HTTP handlers and routes: parse and check input, call a service, shape the answer."""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from broker import audit, schemas
from broker.app_schedule import AppTokenScheduler
from broker.app_store import normalise_scope
from broker.apptokens import AppTokenService
from broker.auth import authorize, may_name
from broker.authorize import AuthorizationService
from broker.config import Settings
from broker.crypto import KeyRing
from broker.errors import BrokerError, InvalidRequest, InvalidState, ProviderNotFound, Unavailable
from broker.grants import GrantImport, GrantService
from broker.listing import DEFAULT_LIMIT, MAX_LIMIT, STATES, GrantListing
from broker.metrics import Metrics
from broker.middlewares import client_of
from broker.models import Grant, iso, validate_user_id
from broker.openapi import document
from broker.providers import ProviderRegistry
from broker.refresh import Refresher
from broker.routes import OPERATIONS, Limits
from broker.scheduler import Scheduler
from broker.schemas import GrantStatus, ReadinessCheck, Token
from broker.store import GrantStore

log = structlog.get_logger(__name__)

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
# The browser-facing callback: nothing cached, no referrer (its URL held a code), no framing,
# no subresources, no cookies.
BROWSER = {
    **NO_STORE,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
}


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


async def get_token(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    client = client_of(request)
    with audit.audited(
        audit.TOKEN_HANDOUT, client=client.name, provider=provider, user_id=user_id, source="get"
    ) as fields:
        authorize(client, "tokens:read", provider, user_id)
        settings = request.app[SETTINGS]
        min_ttl = _int_query(request, "min_ttl", settings.default_min_ttl, 0, settings.max_min_ttl)
        grant = await request.app[REFRESHER].token(provider, user_id, min_ttl)
        return _hand_out(request, client.name, grant, fields)


async def report_rejected_token(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request, trailing=1)
    client = client_of(request)
    with audit.audited(
        audit.TOKEN_HANDOUT,
        client=client.name,
        provider=provider,
        user_id=user_id,
        source="rejected_report",
    ) as fields:
        authorize(client, "tokens:read", provider, user_id)
        request.app[PROVIDERS].get(provider)
        body = schemas.RejectedToken.parse(await _json_object(request))
        refresher = request.app[REFRESHER]
        grant = await refresher.replace_rejected(provider, user_id, body.rejected_token)
        return _hand_out(request, client.name, grant, fields)


async def get_app_token(request: web.Request) -> web.Response:
    provider = request.match_info["provider"]
    client = client_of(request)
    with audit.audited(
        audit.APP_TOKEN_HANDOUT, client=client.name, provider=provider, user_id=None
    ) as fields:
        authorize(client, "tokens:read", provider)
        settings = request.app[SETTINGS]
        min_ttl = _int_query(request, "min_ttl", settings.default_min_ttl, 0, settings.max_min_ttl)
        scope = normalise_scope(request.query.get("scope"))
        fields["scope"] = scope
        token = await request.app[APP_TOKENS].token(provider, scope, min_ttl)
    request.app[METRICS].app_token_handouts.labels(provider, client.name).inc()
    answer = Token(
        access_token=token.access_token,
        token_type=token.token_type,
        expires_at=_iso(token.access_expires_at),
        expires_in=max(0, int(token.access_expires_at - _now(request))),
        scope=token.granted_scope,
    )
    return _answer(answer)


def _hand_out(
    request: web.Request, client: str, grant: Grant, fields: dict[str, Any]
) -> web.Response:
    """The grant's access token as a ``Token`` answer, counted; its expiry goes to the audit
    event's ``fields``."""
    assert grant.access_token is not None
    metrics = request.app[METRICS]
    metrics.child(metrics.token_handouts, grant.provider, client).inc()
    expires_at = grant.access_expires_at  # None: no stated expiry (a grant never refreshed)
    fields["expires_at"] = iso(expires_at)
    # The ``Token`` schema's fields, in its order, without building the model: this is the
    # hot path, and every value comes from a stored grant (tests/test_contract.py checks it).
    answer = {
        "access_token": grant.access_token,
        "token_type": grant.token_type,
        "expires_at": None if expires_at is None else _iso(expires_at),
        "expires_in": None if expires_at is None else max(0, int(expires_at - _now(request))),
        "scope": grant.scope,
    }
    return web.Response(text=json.dumps(answer), content_type="application/json", headers=NO_STORE)


async def put_grant(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    client = client_of(request)
    with audit.audited(
        audit.GRANT_IMPORT, client=client.name, provider=provider, user_id=user_id
    ) as fields:
        authorize(client, "grants:write", provider, user_id)
        request.app[PROVIDERS].get(provider)
        body = schemas.GrantImport.parse(await _json_object(request))
        grant, created = await request.app[GRANTS].import_grant(
            provider,
            user_id,
            GrantImport(
                refresh_token=body.refresh_token,
                access_token=body.access_token,
                expires_in=body.expires_in,
                scope=body.scope,
                expires_at=body.expires_at_timestamp(),
            ),
        )
        fields["replaced"] = not created
    return _answer(GrantStatus.model_validate(grant.status()), status=201 if created else 200)


async def get_grant(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    authorize(client_of(request), "grants:read", provider, user_id)
    grant = await request.app[GRANTS].status(provider, user_id)
    return _answer(GrantStatus.model_validate(grant.status()))


async def list_grants(request: web.Request) -> web.Response:
    provider = request.match_info["provider"]
    client = client_of(request)
    authorize(client, "grants:read", provider)
    request.app[PROVIDERS].get(provider)
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
    limit = _int_query(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    page = await GrantListing(request.app[STORE]).page(
        provider, state, limit, request.query.get("cursor")
    )
    answer = schemas.GrantList(
        # A client restricted by user_ids sees its own user ids only (a page may then hold
        # fewer than ``limit`` grants; the cursor still walks them all).
        grants=[
            GrantStatus.model_validate(grant.status())
            for grant in page.grants
            if may_name(client, grant.user_id)
        ],
        next_cursor=page.next_cursor,
    )
    return _answer(answer)


async def delete_grant(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    client = client_of(request)
    with audit.audited(
        audit.GRANT_DELETE, client=client.name, provider=provider, user_id=user_id
    ) as fields:
        authorize(client, "grants:write", provider, user_id)
        outcome = await request.app[GRANTS].delete(provider, user_id)
        fields["revocation"] = outcome
    return web.Response(status=204, headers={"Broker-Revocation": outcome})


async def start_authorization(request: web.Request) -> web.Response:
    provider = request.match_info["provider"]
    client = client_of(request)
    with audit.audited(
        audit.AUTHORIZATION_START, client=client.name, provider=provider, user_id=None
    ) as fields:
        authorize(client, "grants:write", provider)
        request.app[PROVIDERS].get(provider)
        body = schemas.AuthorizationRequest.parse(await _json_object(request))
        user_id = validate_user_id(body.user_id)  # after the fields' own checks, as always
        fields["user_id"] = user_id
        authorize(client, "grants:write", provider, user_id)
        started = await request.app[AUTHORIZATIONS].start(
            provider, user_id, body.redirect_after, body.scope, client=client.name
        )
        fields["expires_at"] = _iso(started.expires_at)
    answer = schemas.Authorization(
        authorization_url=started.authorization_url,
        state=started.state,
        expires_at=_iso(started.expires_at),
    )
    return _answer(answer, status=201)


async def oauth_callback(request: web.Request) -> web.Response:
    """The user's browser, back from the provider: a redirect to ``redirect_after``, or a
    small HTML page saying what happened when there is nowhere trustworthy to send it."""
    provider = request.match_info["provider"]
    try:
        result = await request.app[AUTHORIZATIONS].complete(provider, request.query)
    except BrokerError as err:
        outcome = "invalid_state" if isinstance(err, InvalidState) else err.code
        audit.record(
            audit.AUTHORIZATION_FINISH,
            client=None,
            provider=provider,
            user_id=None,
            outcome=outcome,
        )
        return _callback_page(request, err)
    except Exception:
        log.exception("authorization.callback_failed", provider=provider)
        audit.record(
            audit.AUTHORIZATION_FINISH,
            client=None,
            provider=provider,
            user_id=None,
            outcome="internal_error",
        )
        return _callback_page(request, BrokerError())
    audit.record(
        audit.AUTHORIZATION_FINISH,
        client=result.client,
        provider=provider,
        user_id=result.user_id,
        outcome=result.outcome,
        reason=result.error,
        replaced=result.replaced if result.grant is not None else None,
    )
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
    return _answer(schemas.Health(status="ok"), headers=None)


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, ReadinessCheck] = {}
    try:
        latency = await request.app[STORE].ping()
        checks["redis"] = ReadinessCheck(ok=True, latency_ms=round(latency, 2))
    except BrokerError as err:
        checks["redis"] = ReadinessCheck(ok=False, detail=err.detail)
    checks["encryption_keys"] = ReadinessCheck(ok=True, keys=len(request.app[KEYRING].key_ids))
    if SCHEDULER in request.app:
        scheduler = request.app[SCHEDULER]
        checks["scheduler"] = ReadinessCheck(
            ok=scheduler.running, lag_seconds=round(scheduler.lag, 3)
        )
    if request.app[STOPPING].is_set():
        checks["shutdown"] = ReadinessCheck(ok=False, detail="shutting down")
    ready = all(check.ok for check in checks.values())
    answer = schemas.Readiness(status="ready" if ready else "not_ready", checks=checks)
    return _answer(answer, status=200 if ready else 503, headers=None)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def openapi(request: web.Request) -> web.Response:
    """The contract with this instance's limits (``min_ttl``'s default and maximum, ...)."""
    body = document(Limits.of(request.app[SETTINGS]))
    return web.Response(body=body, content_type="application/json")


HANDLERS: dict[str, Handler] = {
    "getToken": get_token,
    "reportRejectedToken": report_rejected_token,
    "getAppToken": get_app_token,
    "importGrant": put_grant,
    "getGrant": get_grant,
    "listGrants": list_grants,
    "deleteGrant": delete_grant,
    "startAuthorization": start_authorization,
    "oauthCallback": oauth_callback,
    "healthz": healthz,
    "readyz": readyz,
    "metrics": metrics,
    "openapi": openapi,
}


def add_routes(app: web.Application) -> None:
    """One route per row of the route table (``broker.routes``), which the document is built
    from; a row without a handler, or a handler without a row, stops start-up."""
    missing = {op.operation_id for op in OPERATIONS} ^ set(HANDLERS)
    if missing:
        raise RuntimeError(f"route table and handlers disagree on: {', '.join(sorted(missing))}")
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, HANDLERS[op.operation_id])


def _now(request: web.Request) -> float:
    return request.app[REFRESHER].clock()


def _iso(ts: float) -> str:
    text = iso(ts)
    assert text is not None
    return text


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,7}", raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _answer(
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
