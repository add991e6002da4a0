"""``broker demo``: the whole product on one machine, in one command, without Redis.

It starts, in this process, the fake provider (short-lived access tokens, rotating refresh
tokens), a broker on the embedded store with a fresh API key, and a tiny page standing in for
the calling application. Then it connects a demo user through the real authorization-code flow
(an HTTP client follows every redirect; the fake provider approves at once), and shows, live,
the grant being refreshed in the background before each expiry while the application's token
fetches (through ``broker.client.BrokerClient``, cached while the token lasts) keep succeeding,
until Ctrl-C / SIGTERM, ``--duration`` or ``--refreshes``.

Like ``cli.py`` this is an entry point: it wires an app together, so it may import ``app``.
Nothing imports it but ``cli``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web
from yarl import URL

from broker.app import create_app
from broker.auth import hash_key, new_api_key
from broker.client import BrokerClient, BrokerError, RetryPolicy, Token
from broker.config import Settings, build_settings
from broker.devprovider import DevProvider, DevProviderSettings
from broker.logs import configure_logging

PROVIDER = "demo"
USER_ID = "demo-user"
DEFAULT_TOKEN_TTL = 30
MIN_TOKEN_TTL = 5  # the refresh-timing rule holds from 5-second lifetimes up
MAX_INTERVAL = 5.0
HTTP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    token_ttl: int = DEFAULT_TOKEN_TTL
    duration: float | None = None  # seconds of watching; None: until Ctrl-C
    refreshes: int | None = None  # stop once this many background refreshes were seen
    once: bool = False  # connect, show one status line, stop
    port: int = 0  # broker's port; 0: any free one
    verbose: bool = False  # broker's own log lines on stderr

    @property
    def interval(self) -> float:
        """Seconds between status lines: several per token lifetime."""
        return min(MAX_INTERVAL, self.token_ttl / 4)


def run(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; the exit status is 0 when the flow connected (and, with ``refreshes``,
    that many background refreshes were seen)."""
    configure_logging("console", "info" if options.verbose else "error", stream=sys.stderr)
    return asyncio.run(_Demo(options, out).main())


class _Demo:
    def __init__(self, options: DemoOptions, out: TextIO) -> None:
        self.options = options
        self._out = out
        self.stop = asyncio.Event()
        self.api_key = new_api_key()
        self.refreshes = 0
        self.fetches = 0
        self.failed_fetches = 0
        self._last_token: Token | None = None

    def say(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, self.stop.set)
        provider = DevProvider(
            DevProviderSettings(
                client_secret="demo-" + new_api_key(),
                access_token_ttl=self.options.token_ttl,
                rotate_refresh_tokens=True,
            )
        )
        await provider.start()
        runners: list[web.AppRunner] = []
        try:
            app_url = await _serve(_application_page(), runners)
            broker_url = await self._start_broker(provider, app_url, runners)
            self._introduce(provider, broker_url, app_url)
            timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
            retry = RetryPolicy(max_wait=self.options.interval)
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                BrokerClient(broker_url, self.api_key, min_ttl=0, retry=retry) as tokens,
            ):
                if not await self._connect(http, broker_url, app_url):
                    return 1
                await self._watch(http, tokens, broker_url)
        finally:
            for runner in reversed(runners):  # broker first: its scheduler stops calling out
                await runner.cleanup()
            await provider.close()
        self.say()
        self.say(
            f"Stopped. {self.refreshes} background refresh(es), {self.fetches} token fetch(es)"
            + (f", {self.failed_fetches} failed." if self.failed_fetches else ", all OK.")
            + " Nothing was kept: the embedded store lived in this process."
        )
        wanted = self.options.refreshes
        return 1 if wanted is not None and self.refreshes < wanted else 0

    async def _start_broker(
        self, provider: DevProvider, app_url: str, runners: list[web.AppRunner]
    ) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", self.options.port))
        port = sock.getsockname()[1]
        settings = _broker_settings(provider, hash_key(self.api_key), port, app_url)
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.SockSite(runner, sock).start()
        return settings.public_url

    def _introduce(self, provider: DevProvider, broker_url: str, app_url: str) -> None:
        ttl = self.options.token_ttl
        self.say("broker demo: the whole flow on this machine, no Redis needed.")
        self.say()
        self.say(f"  fake provider  {provider.base_url}")
        self.say(f"                 ({ttl}-second access tokens, rotating refresh tokens)")
        self.say(f"  broker         {broker_url}")
        self.say("                 (embedded store: nothing is kept after exit)")
        self.say(f"  your app       {app_url}  (where users land after connecting)")
        self.say(f"  API key        {self.api_key}  (valid for this run only)")
        self.say()

    async def _connect(self, http: aiohttp.ClientSession, broker_url: str, app_url: str) -> bool:
        self.say(f'1. Your app asks broker to connect user "{USER_ID}":')
        body = {"user_id": USER_ID, "redirect_after": app_url + "/connected"}
        async with http.post(
            f"{broker_url}/v1/authorizations/{PROVIDER}", json=body, headers=self._auth
        ) as response:
            started = await response.json()
            self.say(f"   POST /v1/authorizations/{PROVIDER} -> {response.status}")
        if response.status != 201:
            self.say(f"   failed: {started.get('detail')}")
            return False
        self.say("   It answers with the provider's authorization URL (state + PKCE):")
        self.say(f"   {started['authorization_url']}")
        self.say()
        self.say("2. The user's browser follows it. The fake provider approves at once (a real")
        self.say("   one shows a login and consent page), then sends the browser back to broker,")
        self.say("   which exchanges the code for tokens and sends it on to your app:")
        async with http.get(started["authorization_url"]) as landed:
            for hop in (*landed.history, landed):
                self.say(f"   GET {_short(hop.url)} -> {hop.status}")
        query = landed.url.query
        if landed.status != 200 or query.get("status") != "connected":
            self.say(f"   the flow did not connect: {dict(query)}")
            return False
        self.say(f"   Your app got status={query['status']}: the user is connected.")
        self.say()
        self.say("3. broker now holds the grant and refreshes it before each expiry, in the")
        self.say("   background. Your app fetches its token with broker.client.BrokerClient,")
        self.say("   which keeps it in the process while it lasts (cached) and asks broker")
        self.say("   again when it has expired (new). It uses min_ttl=0, so fetches never")
        self.say("   refresh themselves: every refresh below is the scheduler's. Try it yourself:")
        self.say(
            f"   curl -H 'Authorization: Bearer {self.api_key}' "
            f"{broker_url}/v1/tokens/{PROVIDER}/{USER_ID}"
        )
        self.say()
        return True

    async def _watch(
        self, http: aiohttp.ClientSession, tokens: BrokerClient, broker_url: str
    ) -> None:
        started = time.monotonic()
        duration = self.options.duration
        deadline = None if duration is None else started + duration
        seen_count: int | None = None
        ticks = 0
        while True:
            grant, line = await self._status(http, tokens, broker_url)
            count = grant.get("refresh_count") if grant else None
            if isinstance(count, int):
                if seen_count is not None and count > seen_count:
                    self.refreshes += count - seen_count
                    self.say(
                        f"{_clock()}  * refreshed in the background (refresh #{count}): "
                        "new access token, old refresh token rotated out"
                    )
                seen_count = count
            self.say(line)
            if self.options.once or self._enough(deadline):
                return
            ticks += 1
            wake = started + ticks * self.options.interval  # no drift
            if deadline is not None:
                wake = min(wake, deadline)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, wake - time.monotonic()))
            if self.stop.is_set() or self._enough(deadline):
                return

    def _enough(self, deadline: float | None) -> bool:
        wanted = self.options.refreshes
        if wanted is not None and self.refreshes >= wanted:
            return True
        return deadline is not None and time.monotonic() >= deadline

    async def _status(
        self, http: aiohttp.ClientSession, tokens: BrokerClient, broker_url: str
    ) -> tuple[dict[str, Any] | None, str]:
        now = time.time()
        self.fetches += 1
        try:
            token = await tokens.token(PROVIDER, USER_ID)
        except BrokerError as err:
            self.failed_fetches += 1
            fetch = f"token fetch FAILED: {err.code}"
        else:
            fetch = f"token fetch OK ({_describe(token, self._last_token)})"
            self._last_token = token
        try:
            async with http.get(
                f"{broker_url}/v1/grants/{PROVIDER}/{USER_ID}", headers=self._auth
            ) as response:
                grant: dict[str, Any] = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            return None, f"{_clock()}  {fetch} | broker did not answer ({type(err).__name__})"
        state = grant.get("state", "?")
        due = _seconds_until(grant.get("next_refresh_at"), now)
        refreshed = grant.get("refresh_count", 0)
        return grant, (
            f"{_clock()}  {fetch} | grant {state}, refreshed {refreshed}x, next refresh in {due}"
        )

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def _broker_settings(provider: DevProvider, key_digest: str, port: int, app_url: str) -> Settings:
    """broker's configuration for the demo: the dev provider, one client, the app's page
    allowed as a place to return to, and no Redis (the embedded store)."""
    raw: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "redirect_allowlist": [app_url + "/"],
        "providers": {
            PROVIDER: {
                "token_url": provider.token_url,
                "authorize_url": provider.authorize_url,
                "revocation_url": provider.revocation_url,
                "client_id": provider.settings.client_id,
                "client_secret": provider.settings.client_secret,
                "scopes": ["public_api"],
            }
        },
        "clients": [
            {
                "name": "demo",
                "key_sha256": key_digest,
                "providers": ["*"],
                "permissions": ["tokens:read", "grants:read", "grants:write"],
            }
        ],
    }
    # No environment: a BROKER_REDIS_URL in the caller's shell must not reach the demo.
    return build_settings(raw, {}, base_dir=Path.cwd())


def _application_page() -> web.Application:
    """The calling application's landing page, where users arrive after connecting."""

    async def landing(request: web.Request) -> web.Response:
        status = request.query.get("status", "?")
        return web.Response(text=f"Back in your application: status={status}\n")

    app = web.Application()
    app.router.add_get("/{tail:.*}", landing)
    return app


async def _serve(app: web.Application, runners: list[web.AppRunner]) -> str:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}"


def _short(url: URL) -> str:
    """A URL for display: the query's values elided (codes and states are secrets)."""
    if not url.query:
        return str(url)
    keys = "&".join(f"{k}=..." for k in url.query)
    return f"{url.with_query(None)}?{keys}"


def _describe(token: Token, previous: Token | None) -> str:
    """A token for display: a fingerprint (never the token), where it came from, its life."""
    fingerprint = hashlib.sha256(token.access_token.encode()).hexdigest()[:8]
    origin = "cached" if token is previous else "new"  # the client's cache hands out one object
    left = token.seconds_left()
    life = "no expiry" if left is None else f"expires in {max(0, round(left)):>3} s"
    return f"token {fingerprint}, {origin:>6}, {life}"


def _seconds_until(stamp: Any, now: float) -> str:
    if not isinstance(stamp, str):
        return "-"
    from datetime import datetime

    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    return f"{max(0, round(moment - now)):>3} s"


def _clock() -> str:
    return time.strftime("%H:%M:%S")
