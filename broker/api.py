"""The client API's handlers (API key required) and the registration of every route's handler."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from broker import api_public, audit, schemas
from broker.api_base import (
    APP_SCHEDULER,
    APP_TOKENS,
    AUTHORIZATIONS,
    GRANTS,
    KEYRING,
    METRICS,
    NO_STORE,
    PROVIDERS,
    REFRESHER,
    SCHEDULER,
    SETTINGS,
    STOPPING,
    STORE,
    grant_path,
    int_query,
    iso_of,
    json_answer,
    json_object,
    now,
)
from broker.app_store import normalise_scope
from broker.auth import authorize, may_name
from broker.errors import InvalidRequest
from broker.grants import GrantImport
from broker.listing import DEFAULT_LIMIT, MAX_LIMIT, STATES, GrantListing
from broker.middlewares import client_of
from broker.models import Grant, iso, validate_user_id
from broker.routes import OPERATIONS
from broker.schemas import GrantStatus, Token

# The app keys are re-exported: broker.app and the tests take them from here.
__all__ = [
    "APP_SCHEDULER",
    "APP_TOKENS",
    "AUTHORIZATIONS",
    "GRANTS",
    "HANDLERS",
    "KEYRING",
    "METRICS",
    "PROVIDERS",
    "REFRESHER",
    "SCHEDULER",
    "SETTINGS",
    "STOPPING",
    "STORE",
    "add_routes",
]


async def get_token(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    client = client_of(request)
    with audit.audited(
        audit.TOKEN_HANDOUT, client=client.name, provider=provider, user_id=user_id, source="get"
    ) as fields:
        authorize(client, "tokens:read", provider, user_id)
        settings = request.app[SETTINGS]
        min_ttl = int_query(request, "min_ttl", settings.default_min_ttl, 0, settings.max_min_ttl)
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
        body = schemas.RejectedToken.parse(await json_object(request))
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
        min_ttl = int_query(request, "min_ttl", settings.default_min_ttl, 0, settings.max_min_ttl)
        scope = normalise_scope(request.query.get("scope"))
        fields["scope"] = scope
        token = await request.app[APP_TOKENS].token(provider, scope, min_ttl)
    request.app[METRICS].app_token_handouts.labels(provider, client.name).inc()
    answer = Token(
        access_token=token.access_token,
        token_type=token.token_type,
        expires_at=iso_of(token.access_expires_at),
        expires_in=max(0, int(token.access_expires_at - now(request))),
        scope=token.granted_scope,
    )
    return json_answer(answer)


def _hand_out(
    request: web.Request, client: str, grant: Grant, fields: dict[str, Any]
) -> web.Response:
    """The grant's access token as a ``Token`` answer, counted; its expiry goes to the audit
    event's ``fields``."""
    assert grant.access_token is not None
    metrics = request.app[METRICS]
    metrics.child(metrics.token_handouts, grant.provider, client).inc()
    expires_at = grant.access_expires_at  # None: no stated expiry (a grant never refreshed)
    fields["expires_at"] = stated = iso(expires_at)
    # The ``Token`` schema's fields, in its order, without building the model: this is the
    # hot path, and every value comes from a stored grant (tests/test_contract.py checks it).
    answer = {
        "access_token": grant.access_token,
        "token_type": grant.token_type,
        "expires_at": stated,
        "expires_in": None if expires_at is None else max(0, int(expires_at - now(request))),
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
        body = schemas.GrantImport.parse(await json_object(request))
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
    return json_answer(GrantStatus.model_validate(grant.status()), status=201 if created else 200)


async def get_grant(request: web.Request) -> web.Response:
    provider, user_id = grant_path(request)
    authorize(client_of(request), "grants:read", provider, user_id)
    grant = await request.app[GRANTS].status(provider, user_id)
    return json_answer(GrantStatus.model_validate(grant.status()))


async def list_grants(request: web.Request) -> web.Response:
    provider = request.match_info["provider"]
    client = client_of(request)
    authorize(client, "grants:read", provider)
    request.app[PROVIDERS].get(provider)
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
    limit = int_query(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
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
    return json_answer(answer)


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
        body = schemas.AuthorizationRequest.parse(await json_object(request))
        user_id = validate_user_id(body.user_id)  # after the fields' own checks, as always
        fields["user_id"] = user_id
        authorize(client, "grants:write", provider, user_id)
        started = await request.app[AUTHORIZATIONS].start(
            provider, user_id, body.redirect_after, body.scope, client=client.name
        )
        fields["expires_at"] = iso_of(started.expires_at)
    answer = schemas.Authorization(
        authorization_url=started.authorization_url,
        state=started.state,
        expires_at=iso_of(started.expires_at),
    )
    return json_answer(answer, status=201)


HANDLERS: dict[str, Handler] = {
    "getToken": get_token,
    "reportRejectedToken": report_rejected_token,
    "getAppToken": get_app_token,
    "importGrant": put_grant,
    "getGrant": get_grant,
    "listGrants": list_grants,
    "deleteGrant": delete_grant,
    "startAuthorization": start_authorization,
    "oauthCallback": api_public.oauth_callback,
    "healthz": api_public.healthz,
    "readyz": api_public.readyz,
    "metrics": api_public.metrics,
    "openapi": api_public.openapi,
}


def add_routes(app: web.Application) -> None:
    """One route per row of the route table (``broker.routes``), which the document is built
    from; a row without a handler, or a handler without a row, stops start-up."""
    missing = {op.operation_id for op in OPERATIONS} ^ set(HANDLERS)
    if missing:
        raise RuntimeError(f"route table and handlers disagree on: {', '.join(sorted(missing))}")
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, HANDLERS[op.operation_id])
