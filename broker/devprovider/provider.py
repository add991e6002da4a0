"""``DevProvider``: the dev provider's controls for tests, and serving it over HTTP."""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from broker.devprovider.endpoints import GrantEndpoints
from broker.devprovider.settings import (
    DevProviderSettings,
    FailureKind,
    _Failure,
    _Grant,
)
from broker.devprovider.tokens import TokenEndpoint


class DevProvider(TokenEndpoint, GrantEndpoints):
    """The server and its controls. Token state lives in memory; nothing is persisted."""

    def __init__(self, settings: DevProviderSettings | None = None) -> None:
        self.settings = settings or DevProviderSettings()
        self.base_url = ""
        self._refresh_tokens = {}
        self._access_tokens = {}
        self._codes = {}
        self._verifiers = set()
        self._failures = []
        self._always = None
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
        self.client_credentials_requests = 0
        self.revocations = []
        self.auth_methods_seen = []

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

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Serve on ``host:port`` (0: any free port) and return the base URL; over HTTPS with
        ``ssl_context`` (a server context: tests of broker's certificate checks).

        Handlers are cancelled when their caller disconnects, so a refresh the broker gave up
        on (timeout) never rotates the refresh token behind its back.
        """
        self._closing.clear()
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        bound = self._runner.addresses[0][1]
        self.base_url = f"{'http' if ssl_context is None else 'https'}://{host}:{bound}"
        return self.base_url

    async def close(self) -> None:
        """Stop serving; held and slow requests are woken so that shutdown is immediate."""
        self._closing.set()
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
