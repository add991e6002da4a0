"""The dev provider's token endpoint: refresh_token, authorization_code and client_credentials
grants, rotation, reuse detection, and the failures tests ask for."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from urllib.parse import urlencode

from aiohttp import web

from broker.devprovider.settings import _AccessToken, _Failure, _Grant
from broker.devprovider.state import ProviderState
from broker.devprovider.wire import _error, _form, _gone, _pkce_ok


class TokenEndpoint(ProviderState):
    """POST /token."""

    async def _token(self, request: web.Request) -> web.Response:
        async with self._arrived:
            self.token_requests += 1
            self._arrived.notify_all()
        failure = self._failures.pop(0) if self._failures else self._always
        form = await _form(request)
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            self.refresh_requests += 1
        elif grant_type == "authorization_code":
            self.code_exchanges += 1
        elif grant_type == "client_credentials":
            self.client_credentials_requests += 1
        await self._released.wait()
        if failure is not None and failure.kind == "slow":
            with contextlib.suppress(TimeoutError):  # close() cuts the delay short
                await asyncio.wait_for(self._closing.wait(), failure.delay)
        elif failure is not None:
            return self._failure(failure)  # failed before doing anything: no token is spent
        if self._closing.is_set() or _gone(request):
            return web.Response(status=503, text="shutting down")
        if not self._authenticate(request, form):
            return self._invalid_client()
        if grant_type == "refresh_token":
            return self._refresh(form)
        if grant_type == "authorization_code":
            return self._exchange(form)
        if grant_type == "client_credentials" and self.settings.client_credentials:
            return self._client_token(form)
        if not grant_type:
            return _error(400, "invalid_request")
        return _error(400, "unsupported_grant_type")

    def _refresh(self, form: dict[str, str]) -> web.Response:
        presented = form.get("refresh_token")
        if not presented:
            return _error(400, "invalid_request")
        grant = self._refresh_tokens.get(presented)
        if grant is None or grant.revoked:
            return _error(400, "invalid_grant")
        if presented != grant.refresh_token:
            self.reused_refresh_tokens += 1  # the caller lost track of a rotation
            if self.settings.reuse_revokes:
                grant.revoked = True  # either presenter may be a thief: neither keeps the grant
            return _error(400, "invalid_grant")
        return self._answer(grant, new_refresh_token=self.settings.rotate_refresh_tokens)

    def _exchange(self, form: dict[str, str]) -> web.Response:
        s = self.settings
        value, redirect_uri = form.get("code"), form.get("redirect_uri")
        if form.get("code_verifier"):
            self._verifiers.add(form["code_verifier"])
        if not value or not redirect_uri:
            return _error(400, "invalid_request")
        code = self._codes.get(value)
        if code is None:
            return _error(400, "invalid_grant")
        if code.used:  # RFC 6749 4.1.2: a replayed code revokes what it bought
            if code.grant is not None:
                code.grant.revoked = True
            return _error(400, "invalid_grant")
        code.used = True  # single presentation, even when it fails below
        if (
            time.time() >= code.expires_at
            or redirect_uri != code.redirect_uri
            or not _pkce_ok(code.challenge, form.get("code_verifier"))
        ):
            return _error(400, "invalid_grant")
        code.grant = _Grant(code.subject, code.scope)
        offline = s.offline_scope
        issue = offline is None or offline in code.scope.split()
        return self._answer(code.grant, new_refresh_token=issue and s.issue_refresh_tokens)

    def _client_token(self, form: dict[str, str]) -> web.Response:
        """The client's own token (RFC 6749 4.4): the scope asked for, echoed (``invalid_scope``
        beyond ``grantable_scopes``); no refresh token (4.4.3)."""
        s = self.settings
        scope = " ".join(form.get("scope", "").split()) or s.scope
        if s.grantable_scopes is not None and not set(scope.split()) <= set(s.grantable_scopes):
            return _error(400, "invalid_scope")
        ttl = s.access_token_ttl if s.client_token_ttl is None else s.client_token_ttl
        return self._answer(_Grant(s.client_id, scope), new_refresh_token=False, ttl=ttl)

    def _answer(
        self, grant: _Grant, *, new_refresh_token: bool, ttl: int | None = None
    ) -> web.Response:
        s = self.settings
        ttl = s.access_token_ttl if ttl is None else ttl
        access = "at_" + secrets.token_urlsafe(24)
        self._access_tokens[access] = _AccessToken(grant, time.time() + ttl)
        body: dict[str, str | int] = {
            "access_token": access,
            "token_type": "bearer" if s.form_encoded else "Bearer",
        }
        if s.include_expires_in:
            body["expires_in"] = ttl
        if new_refresh_token:
            body["refresh_token"] = self._new_refresh_token(grant)
        if s.include_scope:
            body["scope"] = grant.scope
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if not s.form_encoded:
            return web.json_response(body, headers=headers)
        form = "application/x-www-form-urlencoded"
        return web.Response(text=urlencode(body), content_type=form, headers=headers)

    def _failure(self, failure: _Failure) -> web.Response:
        kind = failure.kind
        if kind == "invalid_grant":
            return _error(400, "invalid_grant")
        if kind == "invalid_client":
            return self._invalid_client()
        if kind == "rate_limited":
            retry_after = str(failure.retry_after or 1)
            return web.Response(status=429, text="slow down", headers={"Retry-After": retry_after})
        if kind == "garbage":
            return web.Response(text="<html>oops", content_type="text/html")
        if kind == "no_access_token":
            return web.json_response({"token_type": "Bearer"})
        return web.Response(status=500, text="internal server error")
