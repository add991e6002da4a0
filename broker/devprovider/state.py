"""What the dev provider's endpoints share: its token tables and counters, and client
authentication. ``DevProvider.__init__`` sets every attribute declared here."""

from __future__ import annotations

import asyncio
import secrets

from aiohttp import web

from broker.devprovider.settings import (
    DevProviderSettings,
    RevocationRecord,
    _AccessToken,
    _Code,
    _Failure,
    _Grant,
)
from broker.devprovider.wire import _basic_credentials, _error


class ProviderState:
    """The state of one provider, in memory; the endpoint classes and DevProvider build on it."""

    settings: DevProviderSettings
    base_url: str  # set by start(); assign it yourself when serving app() elsewhere
    _refresh_tokens: dict[str, _Grant]  # every RT ever issued -> its grant
    _access_tokens: dict[str, _AccessToken]
    _codes: dict[str, _Code]
    _verifiers: set[str]  # PKCE verifiers presented: secrets too
    _failures: list[_Failure]
    _always: _Failure | None
    _released: asyncio.Event
    _closing: asyncio.Event
    _arrived: asyncio.Condition
    # counters, zeroed by reset_counters()
    token_requests: int
    refresh_requests: int
    reused_refresh_tokens: int
    code_exchanges: int
    client_credentials_requests: int
    revocations: list[RevocationRecord]
    auth_methods_seen: list[str]

    def _new_refresh_token(self, grant: _Grant) -> str:
        token = "rt_" + secrets.token_urlsafe(32)
        self._refresh_tokens[token] = grant
        grant.refresh_token = token  # the previous one, if any, is rotated out
        return token

    # -- client authentication -----------------------------------------------------------------
    def _authenticate(
        self, request: web.Request, form: dict[str, str], record: bool = True
    ) -> bool:
        """Whether the caller proved to be our client, by the one method configured."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        given: tuple[str, str] | None = None
        if scheme.lower() == "basic":
            method = "client_secret_basic"
            # A secret in the body as well would be a second method (RFC 6749 2.3); a client_id
            # in the body must agree with the header.
            given = None if "client_secret" in form else _basic_credentials(value)
            if given is not None and form.get("client_id", given[0]) != given[0]:
                given = None
        elif "client_secret" in form:
            method = "client_secret_post"
            given = (form.get("client_id", ""), form["client_secret"])
        else:
            method = "none"
        if record:
            self.auth_methods_seen.append(method)
        if given is None or method != self.settings.client_auth:
            return False
        id_ok = secrets.compare_digest(given[0].encode(), self.settings.client_id.encode())
        secret_ok = secrets.compare_digest(given[1].encode(), self.settings.client_secret.encode())
        return id_ok and secret_ok

    def _invalid_client(self) -> web.Response:
        basic = self.settings.client_auth == "client_secret_basic"
        headers = {"WWW-Authenticate": 'Basic realm="dev"'} if basic else None
        return _error(401, "invalid_client", headers)
