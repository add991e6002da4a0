"""A fake OAuth2 authorization server: a real HTTP server for tests, demos and docker-compose.

It speaks authorization (code + PKCE S256), token (refresh_token and authorization_code grants),
revocation (RFC 7009), introspection (RFC 7662) and discovery, with either client authentication
method. It rotates refresh tokens and counts every rotated-out one presented again (for the broker
that is a bug); like a strict provider (RFC 9700 4.14.2) it then revokes the whole grant, its
live refresh token and access tokens included, since it cannot tell the client from a thief
(``revoke_on_reuse=False``, ``--forgive-reuse``: only count). It can be told to fail in every
way real providers do. It imports nothing from the broker, so the tests measure the broker
against an independent peer. It never logs a token.

    python -m broker.devprovider --port 9000 --access-token-ttl 30
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

from aiohttp import web

FailureKind = Literal[
    "invalid_grant",
    "invalid_client",
    "server_error",
    "rate_limited",
    "garbage",
    "no_access_token",
    "slow",
]
ClientAuth = Literal["client_secret_basic", "client_secret_post"]
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 4.1


@dataclass
class DevProviderSettings:
    """Switches tests flip at run time: every request reads them afresh."""

    client_id: str = "broker-dev"
    client_secret: str = "dev-secret-change-me"
    client_auth: ClientAuth = "client_secret_basic"
    access_token_ttl: int = 3600  # seconds
    rotate_refresh_tokens: bool = True  # a new RT on each refresh; the old one dies at once
    # a rotated-out RT presented again revokes its grant (RFC 9700 4.14.2); None: when rotating
    revoke_on_reuse: bool | None = None
    form_encoded: bool = False  # answer application/x-www-form-urlencoded, token_type "bearer"
    include_expires_in: bool = True
    scope: str = "public_api"  # scope granted when none is asked for
    require_pkce: bool = True  # /authorize rejects requests without a code_challenge
    code_ttl: int = 600  # seconds; codes are also single use
    deny_consent: bool = False  # /authorize redirects back with error=access_denied
    # a code buys a refresh token only when this scope was asked for (Adobe IMS: offline_access)
    offline_scope: str | None = None
    # the user consents to only these of the scopes asked for (a narrower grant); None: all
    grantable_scopes: tuple[str, ...] | None = None

    @property
    def reuse_revokes(self) -> bool:
        """Whether a reuse revokes the grant now: ``revoke_on_reuse``, else whether rotating."""
        if self.revoke_on_reuse is None:
            return self.rotate_refresh_tokens
        return self.revoke_on_reuse


@dataclass(frozen=True)
class RevocationRecord:
    """One call to /revoke, as the broker made it."""

    token: str
    token_type_hint: str | None
    authenticated: bool


@dataclass(frozen=True)
class _Failure:
    kind: FailureKind
    retry_after: int | None
    delay: float


@dataclass
class _Grant:
    """One authorization: its rotation chain of refresh tokens dies with it on revocation."""

    subject: str
    scope: str
    refresh_token: str = ""  # the live one; earlier ones are rotated out
    revoked: bool = False


@dataclass
class _AccessToken:
    grant: _Grant
    expires_at: float
    revoked: bool = False
    issued_at: float = field(default_factory=time.time)

    @property
    def live(self) -> bool:
        return not (self.revoked or self.grant.revoked)


@dataclass
class _Code:
    subject: str
    scope: str
    redirect_uri: str
    challenge: str | None
    expires_at: float
    used: bool = False
    grant: _Grant | None = field(default=None)  # what it bought: revoked if the code is replayed


class DevProvider:
    """The server and its controls. Token state lives in memory; nothing is persisted."""

    def __init__(self, settings: DevProviderSettings | None = None) -> None:
        self.settings = settings or DevProviderSettings()
        self.base_url = ""  # set by start(); assign it yourself when serving app() elsewhere
        self._refresh_tokens: dict[str, _Grant] = {}  # every RT ever issued -> its grant
        self._access_tokens: dict[str, _AccessToken] = {}
        self._codes: dict[str, _Code] = {}
        self._verifiers: set[str] = set()  # PKCE verifiers presented: secrets too
        self._failures: list[_Failure] = []
        self._always: _Failure | None = None
        self._released = asyncio.Event()
        self._released.set()
        self._closing = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.reset_counters()

    # -- controls ----------------------------------------------------------------------------
    def reset_counters(self) -> None:
        self.token_requests = 0
        self.refresh_requests = 0
        self.reused_refresh_tokens = 0
        self.code_exchanges = 0
        self.revocations: list[RevocationRecord] = []
        self.auth_methods_seen: list[str] = []

    def issue_refresh_token(self, subject: str = "user", scope: str | None = None) -> str:
        """A valid refresh token of a new grant, as if a user had authorized (import tests)."""
        return self._new_refresh_token(_Grant(subject, scope or self.settings.scope))

    def fail_next(
        self,
        kind: FailureKind,
        count: int = 1,
        *,
        retry_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """The next ``count`` token requests (in arrival order) fail this way."""
        self._failures.extend(_Failure(kind, retry_after, delay) for _ in range(count))

    def fail_always(
        self, kind: FailureKind, *, retry_after: int | None = None, delay: float = 0.0
    ) -> None:
        """Every token request fails this way (after any fail_next ones) until heal()."""
        self._always = _Failure(kind, retry_after, delay)

    def heal(self) -> None:
        self._failures.clear()
        self._always = None

    def hold(self) -> None:
        """Token requests wait, once counted, until release(): a refresh stays in flight."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def wait_for_token_requests(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Until at least ``n`` token requests have arrived; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: self.token_requests >= n)

    def secrets(self) -> set[str]:
        """Every token and code ever issued, every PKCE verifier presented, and the client
        secret: none may reach a log."""
        issued = {*self._refresh_tokens, *self._access_tokens, *self._codes, *self._verifiers}
        return issued | {self.settings.client_secret}

    def access_token_times(self, subject: str) -> list[tuple[float, float]]:
        """(issued, expires) of every access token issued for ``subject``, oldest first: lets
        a test check that a new token always came before the previous one expired."""
        return sorted(
            (t.issued_at, t.expires_at)
            for t in self._access_tokens.values()
            if t.grant.subject == subject
        )

    def access_token_expires_at(self, token: str) -> float | None:
        """Unix time the token expires (maybe past); None if never issued or revoked."""
        access = self._access_tokens.get(token)
        return access.expires_at if access is not None and access.live else None

    @property
    def issuer(self) -> str:
        return self.base_url

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    @property
    def authorize_url(self) -> str:
        return self.base_url + "/authorize"

    @property
    def revocation_url(self) -> str:
        return self.base_url + "/revoke"

    @property
    def introspection_url(self) -> str:
        return self.base_url + "/introspect"

    # -- serving -----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/revoke", self._revoke)
        app.router.add_post("/introspect", self._introspect)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/.well-known/oauth-authorization-server", self._discovery)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port) and return the base URL.

        Handlers are cancelled when their caller disconnects, so a refresh the broker gave up
        on (timeout) never rotates the refresh token behind its back.
        """
        self._closing.clear()
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound}"
        return self.base_url

    async def close(self) -> None:
        """Stop serving; held and slow requests are woken so that shutdown is immediate."""
        self._closing.set()
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- /token ------------------------------------------------------------------------------
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
        offline = self.settings.offline_scope
        return self._answer(
            code.grant, new_refresh_token=offline is None or offline in code.scope.split()
        )

    def _new_refresh_token(self, grant: _Grant) -> str:
        token = "rt_" + secrets.token_urlsafe(32)
        self._refresh_tokens[token] = grant
        grant.refresh_token = token  # the previous one, if any, is rotated out
        return token

    def _answer(self, grant: _Grant, *, new_refresh_token: bool) -> web.Response:
        s = self.settings
        access = "at_" + secrets.token_urlsafe(24)
        self._access_tokens[access] = _AccessToken(grant, time.time() + s.access_token_ttl)
        body: dict[str, str | int] = {
            "access_token": access,
            "token_type": "bearer" if s.form_encoded else "Bearer",
        }
        if s.include_expires_in:
            body["expires_in"] = s.access_token_ttl
        if new_refresh_token:
            body["refresh_token"] = self._new_refresh_token(grant)
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

    # -- /authorize, /revoke, /introspect, discovery -------------------------------------------
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
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "token_endpoint_auth_methods_supported": [self.settings.client_auth],
                "code_challenge_methods_supported": ["S256"],
            }
        )


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code}, status=status, headers=headers)


def _gone(request: web.Request) -> bool:
    """Whether the caller hung up (servers without handler cancellation get here)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _basic_credentials(value: str) -> tuple[str, str] | None:
    """(client_id, secret) from a Basic credential; each part is form-urlencoded (RFC 6749
    2.3.1) before base64, so a secret may hold a colon."""
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except ValueError:  # bad base64 or UTF-8
        return None
    user, colon, password = decoded.partition(":")
    return (unquote_plus(user), unquote_plus(password)) if colon else None


def _pkce_ok(challenge: str | None, verifier: str | None) -> bool:
    if challenge is None:
        return verifier is None  # a verifier without a challenge is a confused client
    if verifier is None or not _VERIFIER.fullmatch(verifier):
        return False
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return secrets.compare_digest(expected, challenge)


async def _form(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}


async def _serve(provider: DevProvider, host: str, port: int, public_url: str | None) -> None:
    await provider.start(host, port)
    if public_url:
        provider.base_url = public_url.rstrip("/")
    print(f"dev provider listening on {provider.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await provider.close()


def main(argv: list[str] | None = None) -> None:
    """Run the provider until SIGINT/SIGTERM (``broker demo``, docker-compose)."""
    parser = argparse.ArgumentParser(prog="python -m broker.devprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--access-token-ttl", type=int, default=3600, metavar="SECONDS")
    parser.add_argument("--no-rotation", action="store_true", help="keep refresh tokens")
    parser.add_argument(
        "--forgive-reuse",
        action="store_true",
        help="count a reused rotated-out refresh token but do not revoke its grant",
    )
    parser.add_argument("--form-encoded", action="store_true", help="form-encoded token answers")
    parser.add_argument(
        "--client-auth", default="client_secret_basic", choices=get_args(ClientAuth)
    )
    parser.add_argument("--client-id", default=DevProviderSettings.client_id)
    parser.add_argument("--client-secret-env", metavar="VAR", help="take the secret from $VAR")
    parser.add_argument("--public-url", help="base URL to advertise (e.g. behind docker)")
    args = parser.parse_args(argv)
    settings = DevProviderSettings(
        client_id=args.client_id,
        client_auth=args.client_auth,
        access_token_ttl=args.access_token_ttl,
        rotate_refresh_tokens=not args.no_rotation,
        revoke_on_reuse=False if args.forgive_reuse else None,
        form_encoded=args.form_encoded,
    )
    if args.client_secret_env:
        secret = os.environ.get(args.client_secret_env)
        if not secret:
            parser.error(f"environment variable {args.client_secret_env} is not set")
        settings.client_secret = secret
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(DevProvider(settings), args.host, args.port, args.public_url))


if __name__ == "__main__":
    main()
