"""The route table: per operation, its method and path, who may call it, what it takes and what
it answers, with the words clients read. ``api.add_routes`` registers a handler for each row and
``broker.openapi`` builds the OpenAPI document from the rows, so neither can drift from the
other. Nothing here imports aiohttp.

Limits that are settings (``default_min_ttl``, ``max_min_ttl``, ``max_body_bytes``) appear in
the document through :class:`Limits`, taken from the running settings. The row types are in
``broker.route_types``, the rows of the endpoints needing no API key in
``broker.routes_public``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker import schemas
from broker.app_store import MAX_APP_SCOPE_CHARS
from broker.route_types import Limits, Operation, Param, Permission, Reply
from broker.routes_public import PUBLIC_OPERATIONS

__all__ = ["OPERATIONS", "Limits", "Operation", "Param", "Permission", "Reply"]


GRANT = r"/v1/grants/{provider:[^/]+}/{user_id:[^/]*}"
NO_STORE = ("Cache-Control",)


def _min_ttl(limits: Limits) -> Mapping[str, Any]:
    return {
        "type": "integer",
        "minimum": 0,
        "maximum": limits.max_min_ttl,
        "default": limits.default_min_ttl,
    }


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        operation_id="getToken",
        method="GET",
        path=r"/v1/tokens/{provider:[^/]+}/{user_id:[^/]*}",
        tag="tokens",
        summary="Get a current access token for a user",
        description="Returns an access token that stays valid for at least `min_ttl` seconds, "
        "so a client never handles refresh tokens: refresh tokens never leave the broker. If "
        "the held token would expire sooner, the broker refreshes it first. There is one "
        "refresh per grant at a time across all replicas (a distributed lock): concurrent "
        "callers, on any replica, wait for that refresh and share its result, so a rotating "
        "refresh token is never used twice.\n\n"
        "If the held token is below `min_ttl` but still valid and the provider is unavailable "
        "(or the refresh lock is held by a stuck replica), the broker returns the still-valid "
        "token rather than an error; check `expires_in`. `503 upstream_unavailable` is returned "
        "only when the token is expired and cannot be refreshed now. `409 reauth_required` "
        "means the provider rejected the refresh token and a user must authorize again.\n\n"
        "A grant without a refresh token (the provider issued none: Cloud 66, GitHub OAuth apps) "
        "is never refreshed: its token is handed out while valid, whatever `min_ttl` asked "
        "(`expires_at` and `expires_in` are null when the provider stated no expiry), and once "
        "its stated expiry has passed the answer is `409 reauth_required` and the grant's state "
        "becomes `reauth_required`.\n\n"
        "Every token handed out is written to the audit log (client, provider, user id, request "
        "id; never the token). The response carries `Cache-Control: no-store`.",
        permission="tokens:read",
        query=(
            Param(
                "min_ttl",
                "Seconds the returned token must stay valid at least; the broker refreshes "
                "first if the held token would not. `0` accepts any unexpired token. The "
                "default and the maximum are the `default_min_ttl` and `max_min_ttl` settings.",
                _min_ttl,
            ),
        ),
        replies={200: Reply("A current access token.", schemas.Token, headers=NO_STORE)},
        problems=(
            "invalid_request",
            "provider_not_found",
            "grant_not_found",
            "reauth_required",
            "grant_unreadable",
            "upstream_unavailable",
            "store_unavailable",
        ),
    ),
    Operation(
        operation_id="reportRejectedToken",
        method="POST",
        path=r"/v1/tokens/{provider:[^/]+}/{user_id:[^/]*}/refresh",
        tag="tokens",
        summary="Report an access token a resource server refused, and get a new one",
        description="For a token that should still be valid but was refused by a resource "
        "server (`401`: revoked early, keys rotated at the provider). If the grant's current "
        "access token is `rejected_token` (compared in constant time), the broker refreshes "
        "it; if the grant already holds another token (a refresh happened meanwhile, on any "
        "replica), nothing is refreshed and that token is returned, or refreshed first only if "
        "it has expired, as `GET` with `min_ttl=0` would. Either way the answer is the same as "
        "`GET /v1/tokens/{provider}/{user_id}`.\n\n"
        "Many callers reporting the same token, on any replicas, cause one refresh: they wait "
        "for it and share its result, and a caller arriving after the token was replaced gets "
        "the new one without a refresh. The broker never hands back a token reported as "
        "rejected: when it cannot replace it now (the provider is failing, or another replica "
        "holds the grant's lock too long) the answer is `503 upstream_unavailable` with "
        "`Retry-After`. `409 reauth_required` means the provider rejected the refresh token. "
        "For a grant without a refresh token, a rejected token that is the current one cannot "
        "be replaced: the grant becomes `reauth_required` and the answer is `409 "
        "reauth_required` (a user must authorize again).\n\n"
        "Each report is logged (provider, user id; never the token), and each token handed out "
        "is written to the audit log as for `GET`. The response carries "
        "`Cache-Control: no-store`.",
        permission="tokens:read",
        body=schemas.RejectedToken,
        replies={
            200: Reply(
                "A current access token other than the rejected one.",
                schemas.Token,
                headers=NO_STORE,
            )
        },
        problems=(
            "provider_not_found",
            "grant_not_found",
            "reauth_required",
            "grant_unreadable",
            "upstream_unavailable",
            "store_unavailable",
        ),
    ),
    Operation(
        operation_id="getAppToken",
        method="GET",
        path=r"/v1/app-tokens/{provider:[^/]+}",
        tag="tokens",
        summary="Get a current access token for the provider's own client",
        description="An access token for calls an application makes as itself: the "
        "client-credentials grant (RFC 6749 §4.4) of the broker's client at this provider, "
        "which must enable it (`client_credentials = true`; otherwise "
        "`404 app_token_not_configured`). Each distinct scope set is its own token: `scope` is "
        "normalised (order and duplicates do not matter); without `scope` the provider's "
        "default scope is asked for.\n\n"
        "The token is held encrypted in Redis, shared by all replicas and refreshed by the "
        "scheduler before expiry while clients use it; there is one token request per "
        "(provider, scope) at a time across all replicas, and concurrent callers share its "
        "result. `min_ttl` works as for user tokens. When the provider cannot issue a token "
        "now, a still-valid one is returned; `503 upstream_unavailable` only when none is. "
        "A scope the provider refuses (`invalid_scope`) is `400 invalid_request`.\n\n"
        "Every token handed out is written to the audit log (event `app_token.handout`: "
        "client, provider, scope, request id; never the token). The response carries "
        "`Cache-Control: no-store`.",
        permission="tokens:read",
        query=(
            Param(
                "min_ttl",
                "Seconds the returned token must stay valid at least, as for "
                "`GET /v1/tokens/{provider}/{user_id}`.",
                _min_ttl,
            ),
            Param(
                "scope",
                "Space-separated scopes (RFC 6749 §3.3 scope tokens); absent or empty: the "
                "provider's default.",
                {
                    "type": "string",
                    "maxLength": MAX_APP_SCOPE_CHARS,
                    "pattern": "^[\\x21\\x23-\\x5b\\x5d-\\x7e ]*$",
                },
            ),
        ),
        replies={200: Reply("A current app token.", schemas.Token, headers=NO_STORE)},
        problems=(
            "invalid_request",
            "provider_not_found",
            "app_token_not_configured",
            "upstream_unavailable",
            "store_unavailable",
        ),
    ),
    Operation(
        operation_id="importGrant",
        method="PUT",
        path=GRANT,
        tag="grants",
        summary="Import a refresh token as a user's grant",
        description="Stores a refresh token obtained elsewhere (migration, tests) as the grant "
        "for this provider and user id, replacing any existing one. Without an `access_token` "
        "the broker refreshes at once to validate the refresh token: if the provider rejects it "
        "the answer is `422 invalid_refresh_token` and nothing is stored; if the provider is "
        "unreachable, `503 upstream_unavailable`. An `access_token` alone (a provider that "
        "issues no refresh token) makes a grant that is never refreshed: it is served until its "
        "`expires_in` / `expires_at`, or without expiry when neither is given. The tokens are "
        "stored encrypted and never returned; the answer is the grant status.",
        permission="grants:write",
        body=schemas.GrantImport,
        replies={
            200: Reply("An existing grant was replaced.", schemas.GrantStatus, headers=NO_STORE),
            201: Reply("A new grant was stored.", schemas.GrantStatus, headers=NO_STORE),
        },
        problems=(
            "provider_not_found",
            "invalid_refresh_token",
            "grant_unreadable",
            "upstream_unavailable",
            "store_unavailable",
        ),
    ),
    Operation(
        operation_id="getGrant",
        method="GET",
        path=GRANT,
        tag="grants",
        summary="Get a user's grant status",
        description="Shows what the broker holds for this provider and user id — state, scope, "
        "expiry, refresh schedule and history — never a secret. Use it to see whether a user "
        "must authorize again (`state: reauth_required`) or refreshes are failing "
        "(`state: refresh_failing`).",
        permission="grants:read",
        replies={200: Reply("The grant status.", schemas.GrantStatus, headers=NO_STORE)},
        problems=(
            "invalid_request",
            "provider_not_found",
            "grant_not_found",
            "grant_unreadable",
            "store_unavailable",
        ),
    ),
    Operation(
        operation_id="listGrants",
        method="GET",
        path=r"/v1/grants/{provider:[^/]+}",
        tag="grants",
        summary="List a provider's grants",
        description="Lists the grants held for this provider, a page at a time, each as its "
        "status (never a secret): for on-call, and for applications that prompt users to "
        "connect again (`state=reauth_required`). Pass each answer's `next_cursor` as `cursor` "
        "until it is null.\n\n"
        "The cost of a page does not grow with the number of grants stored (a few Redis `SCAN` "
        "or `SSCAN` calls), so a page may hold fewer than `limit` grants, even none, with a "
        "non-null `next_cursor`: only a null `next_cursor` ends the listing. A listing that "
        "runs while grants are created and deleted returns every grant that existed throughout "
        "at least once, and may return one more than once. Records that cannot be decrypted "
        "are left out (a read of one answers `500 grant_unreadable`); each is logged as a "
        "security event and counted in `broker_grants_unreadable`. A client restricted to some "
        "user ids (`user_ids`) is shown only the grants of those.",
        permission="grants:read",
        query=(
            Param(
                "state",
                "Only grants in this state; all grants when absent.",
                {"type": "string", "enum": ["active", "refresh_failing", "reauth_required"]},
            ),
            Param(
                "limit",
                "The most grants one page holds.",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            ),
            Param(
                "cursor",
                "`next_cursor` of the previous page, as is (opaque); absent for the first page. "
                "A cursor of another provider's or state's listing, or a malformed one, is "
                "`400 invalid_request`.",
                {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,1024}$"},
            ),
        ),
        replies={200: Reply("A page of grants.", schemas.GrantList, headers=NO_STORE)},
        problems=("invalid_request", "provider_not_found", "store_unavailable"),
    ),
    Operation(
        operation_id="deleteGrant",
        method="DELETE",
        path=GRANT,
        tag="grants",
        summary="Revoke and delete a user's grant",
        description="Revokes the refresh token (for a grant without one, the access token, "
        "`token_type_hint=access_token`) at the provider (RFC 7009) when the provider has "
        "a `revocation_url` (best effort: a failed revocation does not stop the deletion), then "
        "deletes the grant. The `Broker-Revocation` header tells what happened at the provider. "
        "A grant whose stored record is unreadable is deleted without revocation (`skipped`) so "
        "operators can clear it.",
        permission="grants:write",
        replies={204: Reply("The grant was deleted.", headers=("Broker-Revocation",))},
        problems=(
            "invalid_request",
            "provider_not_found",
            "grant_not_found",
            "upstream_unavailable",
            "store_unavailable",
        ),
    ),
    Operation(
        operation_id="startAuthorization",
        method="POST",
        path=r"/v1/authorizations/{provider:[^/]+}",
        tag="authorizations",
        summary="Start an authorization-code flow for a user",
        description="Creates a single-use `state` (32 random bytes; valid for "
        "`authorization_ttl`, 10 minutes by default) and returns the provider's authorize URL "
        "to send the user's browser to. The URL carries `response_type=code`, `client_id`, "
        "`redirect_uri` (`{public_url}/oauth/{provider}/callback`), `scope` (the client's, or "
        "the provider's configured `scopes` when absent; the provider's `required_scopes` are "
        "always added), `state` and PKCE (`code_challenge`, `code_challenge_method=S256`) "
        "unless the provider disables PKCE (`pkce = false`). The broker stores only the SHA-256 "
        "of the state, and the pending authorization (user id, scope, `redirect_after`, PKCE "
        "verifier) encrypted.\n\n"
        "`redirect_after` must match an entry of the broker's `redirect_allowlist` or the "
        "provider's: the same scheme, host and port, and a path equal to or below the entry's "
        "path (`https://app.example/done` allows `/done` and `/done/x`, not `/donezo`). "
        "Relative URLs, user info, backslashes, whitespace, control and non-ASCII characters, "
        "`%` in the host, empty path segments and dot segments or slashes (also "
        "percent-encoded) are refused with `400 invalid_request`, and nothing is stored. Its "
        "own query and fragment are kept. When the user comes back, "
        "`GET /oauth/{provider}/callback` stores the grant and redirects to `redirect_after`. A "
        "provider without `authorize_url` cannot start authorizations (`400 invalid_request`).",
        permission="grants:write",
        body=schemas.AuthorizationRequest,
        replies={
            201: Reply("The authorization was started.", schemas.Authorization, headers=NO_STORE)
        },
        problems=("provider_not_found", "store_unavailable"),
    ),
    *PUBLIC_OPERATIONS,
)
