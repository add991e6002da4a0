"""Endpoints needing no API key: the browser's OAuth callback, healthz, readyz, metrics, openapi."""

from __future__ import annotations

import html

import structlog
from aiohttp import web

from broker import audit, schemas
from broker.api_base import (
    AUTHORIZATIONS,
    KEYRING,
    METRICS,
    NO_STORE,
    SCHEDULER,
    SETTINGS,
    STOPPING,
    STORE,
    json_answer,
)
from broker.errors import BrokerError, InvalidState, ProviderNotFound, Unavailable
from broker.openapi import document
from broker.routes import Limits
from broker.schemas import ReadinessCheck

log = structlog.get_logger(__name__)

# The browser-facing callback: nothing cached, no referrer (its URL held a code), no framing,
# no subresources, no cookies.
BROWSER = {
    **NO_STORE,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
}


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
    return json_answer(schemas.Health(status="ok"), headers=None)


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
    return json_answer(answer, status=200 if ready else 503, headers=None)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def openapi(request: web.Request) -> web.Response:
    """The contract with this instance's limits (``min_ttl``'s default and maximum, ...)."""
    body = document(Limits.of(request.app[SETTINGS]))
    return web.Response(body=body, content_type="application/json")
