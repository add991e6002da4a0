"""Request ids, the one log line per request, problem JSON for every error, client auth.

Order (outermost first): ``observe`` (request id, timing, metrics, the request's one log line:
its audit event if it has one, else ``request``) →
``problems`` (any exception becomes RFC 9457 JSON) → ``authenticate`` (``/v1/`` only: the API
key, then the client's rate limit).
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from broker import audit
from broker.auth import Authenticator
from broker.config import ClientSettings
from broker.errors import BrokerError, GrantUnreadable, RateLimited, Unauthenticated, Unavailable
from broker.logs import bind_request
from broker.metrics import Metrics
from broker.ratelimit import RateLimiter

log = structlog.get_logger("broker.http")

CLIENT = web.RequestKey("client", ClientSettings)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
REQUEST_ID_HEADER = "X-Request-Id"
INCOMING_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
PROBLEM_TYPE = "urn:broker:problem:"


class RequestIds:
    """Request ids unique across processes and restarts without a uuid4 per request: 64 random
    bits drawn at start, then a counter (ids need to be unique, not secret)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An ``application/problem+json`` response (RFC 9457) with a stable ``code``."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id:
        body["request_id"] = request_id
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


def client_of(request: web.Request) -> ClientSettings:
    client: ClientSettings = request[CLIENT]
    return client


def make_middlewares(
    metrics: Metrics, authenticator: Authenticator, max_body_bytes: int
) -> list[Middleware]:
    new_id = RequestIds()

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        incoming = request.headers.get(REQUEST_ID_HEADER)
        if incoming is not None and INCOMING_REQUEST_ID.match(incoming):
            request_id = incoming
        else:
            request_id = new_id()
        bind_request(request_id)
        line = audit.request_line()
        started = time.perf_counter()
        status = 500
        metrics.http_in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        except web.HTTPException as exc:  # redirects pass through as exceptions
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        finally:
            metrics.http_in_flight.dec()
            elapsed = time.perf_counter() - started
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            method = request.method
            metrics.child(metrics.http_requests, route, method, str(status)).inc()
            metrics.child(metrics.http_duration, route).observe(elapsed)
            fields = {
                "method": method,
                "path": request.path,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            }
            if not line.write(**fields):
                client = request.get(CLIENT)
                name = client.name if isinstance(client, ClientSettings) else None
                (log.warning if status >= 500 else log.info)("request", **fields, client=name)

    @web.middleware
    async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (Unavailable, RateLimited) as err:
            return problem(
                err.status, err.code, err.title, err.detail, {"Retry-After": str(err.retry_after)}
            )
        except Unauthenticated as err:
            return problem(
                err.status,
                err.code,
                err.title,
                err.detail,
                {"WWW-Authenticate": 'Bearer realm="broker"'},
            )
        except GrantUnreadable as err:
            log.error("security.grant_unreadable", path=request.path, reason=err.detail)
            return problem(
                err.status,
                err.code,
                err.title,
                "the stored grant failed decryption; it was not used",
            )
        except BrokerError as err:
            return problem(err.status, err.code, err.title, err.detail)
        except web.HTTPRequestEntityTooLarge:
            return problem(
                413,
                "payload_too_large",
                "Request body too large",
                f"the body exceeds {max_body_bytes} bytes",
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "invalid_request")
            return problem(
                exc.status,
                code,
                exc.reason,
                exc.reason,
                {k: v for k, v in exc.headers.items() if k == "Allow"},
            )
        except Exception:
            log.exception("request.failed")
            return problem(
                500,
                "internal_error",
                "Internal error",
                "an unexpected error occurred; quote the request id to the operators",
            )

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            client = authenticator.authenticate(request.headers.get("Authorization"))
            request[CLIENT] = client
            if client.rate_limit is not None:
                limiter = request.app.get(RATE_LIMITER)
                if limiter is not None:
                    await limiter.check(client)
        return await handler(request)

    return [observe, problems, authenticate]
