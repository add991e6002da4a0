"""The route table's rows for endpoints without an API key: the OAuth callback, operations."""

from __future__ import annotations

from broker import schemas
from broker.route_types import Operation, Param, Reply

BROWSER = ("Cache-Control", "Referrer-Policy")
HTML = {"type": "string"}


def _query(name: str, description: str) -> Param:
    return Param(name, description, {"type": "string"})


PUBLIC_OPERATIONS: tuple[Operation, ...] = (
    Operation(
        operation_id="oauthCallback",
        method="GET",
        path=r"/oauth/{provider:[^/]+}/callback",
        tag="authorizations",
        summary="OAuth2 redirect endpoint (the user's browser)",
        description="Public: called by the user's browser when the provider redirects back; no "
        "API key. Takes the `state` (single use, atomically: of two callbacks with one state "
        "only the first goes on), checks that it is unexpired and was started for this "
        "provider, then: with `code`, exchanges it for tokens (the provider's client "
        "authentication and the PKCE verifier), stores the grant in place of any grant of that "
        "user (for example one in `reauth_required`) and redirects (302) to `redirect_after` "
        "with `status=connected&provider={provider}`; with `error=access_denied` (the user "
        "refused), `status=denied`; with another `error`, or when the exchange fails, "
        "`status=error&code=...` (the provider's error code, or one of `invalid_grant`, "
        "`invalid_client`, `http_<status>`, `timeout`, `malformed_response`, "
        "`no_refresh_token` (only for a provider with `require_refresh_token`: otherwise an "
        "answer without a refresh token stores the access token alone), `store_unavailable`, "
        "...). No token, code or state is ever put in "
        "the redirect; `status`, `code` and `provider` parameters already in `redirect_after` "
        "are replaced. A missing, unknown, expired, reused or other provider's state gets a "
        "small 400 HTML page saying so and what to do, and exchanges nothing; an unknown "
        "provider gets a 404 page and an unreachable store a 503 page (the state is then not "
        "consumed). These pages are not cacheable and set no cookie.",
        permission=None,
        query=(
            _query("code", "The authorization code (on success)."),
            _query(
                "state",
                "The state from `POST /v1/authorizations/{provider}`, as the provider returns it.",
            ),
            _query("error", "The provider's error code instead of `code` (e.g. `access_denied`)."),
            _query("error_description", "The provider's human-readable error text, if any."),
        ),
        replies={
            302: Reply(
                "Redirect to `redirect_after` with `status=connected`, `status=denied` or "
                "`status=error&code=...`, and `provider`.",
                headers=(*BROWSER, "Location"),
            ),
            400: Reply(
                "The state is missing, unknown, expired, already used or was started for "
                "another provider; nothing was exchanged. A small HTML page saying so and to "
                "start again from the application.",
                media="text/html",
                schema=HTML,
                headers=BROWSER,
            ),
            404: Reply(
                "No such provider: an HTML page.", media="text/html", schema=HTML, headers=BROWSER
            ),
            503: Reply(
                "Redis is unreachable: an HTML page; the state was not consumed, so reloading "
                "later works.",
                media="text/html",
                schema=HTML,
                headers=(*BROWSER, "Retry-After"),
            ),
        },
    ),
    Operation(
        operation_id="healthz",
        method="GET",
        path="/healthz",
        tag="operations",
        summary="Liveness",
        description='No API key. Answers `200 {"status": "ok"}` while the process serves; it '
        "checks no dependency (see `/readyz`).",
        permission=None,
        replies={200: Reply("The process is serving.", schemas.Health)},
    ),
    Operation(
        operation_id="readyz",
        method="GET",
        path="/readyz",
        tag="operations",
        summary="Readiness",
        description="No API key. Checks what serving needs (the grant store, encryption keys, "
        "the refresh scheduler, not shutting down) and answers `200` when all pass or `503` "
        "otherwise, with each check's result; take the instance out of load balancing on 503.",
        permission=None,
        replies={
            200: Reply("Ready: every check passed.", schemas.Readiness),
            503: Reply("Not ready: at least one check failed.", schemas.Readiness),
        },
    ),
    Operation(
        operation_id="metrics",
        method="GET",
        path="/metrics",
        tag="operations",
        summary="Prometheus metrics",
        description="No API key. The broker's metrics in the Prometheus text exposition format "
        "(HTTP requests, refreshes by outcome, token hand-outs, revocations, unreadable grants, "
        "...).",
        permission=None,
        replies={
            200: Reply(
                "Metrics in the Prometheus text format 0.0.4.",
                media="text/plain",
                schema={"type": "string"},
            )
        },
    ),
    Operation(
        operation_id="openapi",
        method="GET",
        path="/openapi.json",
        tag="operations",
        summary="This OpenAPI document",
        description="No API key. The HTTP contract as an OpenAPI 3.1 document. Values that are "
        "settings (such as `min_ttl`'s default and maximum) are this instance's.",
        permission=None,
        replies={200: Reply("The OpenAPI document.", schema={"type": "object"})},
    ),
)
