"""The dev provider's other endpoints: /authorize, /revoke (RFC 7009), /introspect (RFC 7662)
and discovery."""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from broker.devprovider.settings import RevocationRecord, _Code
from broker.devprovider.state import ProviderState
from broker.devprovider.wire import _error, _form


class GrantEndpoints(ProviderState):
    """GET /authorize, POST /revoke, POST /introspect and the discovery documents."""

    def _grant_types(self) -> list[str]:
        granted = ["authorization_code", "refresh_token"]
        return [*granted, "client_credentials"] if self.settings.client_credentials else granted

    async def _authorize(self, request: web.Request) -> web.Response:
        """Auto-approve (no UI) and redirect back with a code, as a consenting user would."""
        q, s = request.query, self.settings
        problem = self._authorize_problem(request)
        if problem:
            return web.Response(status=400, text=problem)
        params = {"error": "access_denied", "state": q["state"]}
        if not s.deny_consent:
            code = "code_" + secrets.token_urlsafe(32)
            scope = q.get("scope") or s.scope
            if s.grantable_scopes is not None:
                scope = " ".join(x for x in scope.split() if x in s.grantable_scopes)
            self._codes[code] = _Code(
                subject=q.get("login_hint") or "user",
                scope=scope,
                redirect_uri=q["redirect_uri"],
                challenge=q.get("code_challenge"),
                expires_at=time.time() + s.code_ttl,
            )
            params = {"code": code, "state": q["state"]}
        target = urlsplit(q["redirect_uri"])
        query = urlencode([*parse_qsl(target.query, keep_blank_values=True), *params.items()])
        location = urlunsplit(target._replace(query=query))
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})

    def _authorize_problem(self, request: web.Request) -> str:
        """Why /authorize must refuse (400, no redirect: the request cannot be trusted), or ""."""
        q = request.query
        target = urlsplit(q.get("redirect_uri", ""))
        challenge, method = q.get("code_challenge"), q.get("code_challenge_method")
        if q.get("client_id") != self.settings.client_id:
            return "unknown client_id"
        if target.scheme not in ("http", "https") or not target.netloc:
            return "redirect_uri must be an absolute http(s) URL"
        if q.get("response_type") != "code":
            return "response_type must be code"
        if not q.get("state"):
            return "state is required"
        if challenge is None and self.settings.require_pkce:
            return "code_challenge is required (PKCE)"
        if (challenge is not None or method is not None) and method != "S256":
            return "only code_challenge_method=S256 is supported"
        if challenge is None and method is not None:
            return "code_challenge_method without code_challenge"
        return ""

    async def _revoke(self, request: web.Request) -> web.Response:
        """RFC 7009: 200 even for unknown tokens; a refresh token takes its grant with it."""
        form = await _form(request)
        authenticated = self._authenticate(request, form)
        token = form.get("token", "")
        self.revocations.append(RevocationRecord(token, form.get("token_type_hint"), authenticated))
        if not authenticated:
            return self._invalid_client()
        if not token:
            return _error(400, "invalid_request")
        if token in self._refresh_tokens:
            self._refresh_tokens[token].revoked = True
        if token in self._access_tokens:
            self._access_tokens[token].revoked = True
        return web.Response(status=200)

    async def _introspect(self, request: web.Request) -> web.Response:
        """RFC 7662; an expired, revoked or rotated-out token is inactive."""
        form = await _form(request)
        if not self._authenticate(request, form, record=False):
            return self._invalid_client()
        token = form.get("token", "")
        body: dict[str, Any] = {"active": False}
        access, grant = self._access_tokens.get(token), self._refresh_tokens.get(token)
        if access is not None and access.live and access.expires_at > time.time():
            body = {"active": True, "token_type": "Bearer", "exp": int(access.expires_at)}
            grant = access.grant
        elif grant is not None and not grant.revoked and token == grant.refresh_token:
            body = {"active": True, "token_type": "refresh_token"}
        if body["active"] and grant is not None:
            body.update(scope=grant.scope, sub=grant.subject, client_id=self.settings.client_id)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _discovery(self, request: web.Request) -> web.Response:
        base = self.base_url or str(request.url.origin())
        return web.json_response(
            {
                "issuer": base,
                "authorization_endpoint": base + "/authorize",
                "token_endpoint": base + "/token",
                "revocation_endpoint": base + "/revoke",
                "introspection_endpoint": base + "/introspect",
                "response_types_supported": ["code"],
                "grant_types_supported": self._grant_types(),
                "token_endpoint_auth_methods_supported": [self.settings.client_auth],
                "code_challenge_methods_supported": ["S256"],
            }
        )
