"""Fixtures that build real things: a redis-server, a provider on loopback, broker apps.

Every log line of the whole run goes to one JSON file, and every secret a test makes (tokens the
provider issues, API keys, client secrets, encryption keys) is collected; at the end of the
session no secret may appear in that file.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import aiohttp
import pytest
import redis as syncredis
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from broker.api_base import METRICS
from broker.app import create_app
from broker.auth import hash_key, new_api_key
from broker.config import Settings, build_settings
from broker.devprovider import DevProvider, DevProviderSettings
from broker.logs import OUTPUT, configure_logging
from broker.routes import Limits
from tests.contract import CONTRACTS, check_answers, contract
from tests.exposure import EXPOSURE, leaked

PROVIDER = "dev"
ALL_PERMISSIONS = ["tokens:read", "grants:read", "grants:write"]
SECRETS: set[str] = set()  # every secret made during the run; none may reach the logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session", autouse=True)
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """All logs of the run, as JSON lines; checked for secrets at the end."""
    path = tmp_path_factory.mktemp("logs") / "broker.jsonl"
    with path.open("a", encoding="utf-8") as stream:
        configure_logging("json", "debug", stream=stream)
        yield path
    text = path.read_text(encoding="utf-8")
    leaked = sorted(s for s in SECRETS if len(s) >= 8 and s in text)
    assert not leaked, f"{len(leaked)} secret(s) appear in the logs (first: {leaked[0][:6]}...)"


@pytest.fixture(scope="session", autouse=True)
def exposed_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every answer of the run's brokers that is not a token hand-out (problem bodies,
    /metrics, grant statuses; tests/exposure.py); checked for secrets at the end."""
    EXPOSURE.path = tmp_path_factory.mktemp("exposed") / "answers.txt"
    EXPOSURE.path.touch()
    yield EXPOSURE.path
    found = leaked(SECRETS, EXPOSURE.path.read_text(encoding="utf-8"))
    assert not found, f"{len(found)} secret(s) appear in answers (first: {found[0][:6]}...)"


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Kill the server (tests that prove the broker survives Redis going away)."""
        assert self.process is not None, "only a throwaway redis-server can be stopped"
        self.process.kill()
        self.process.wait(timeout=10)

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        client = syncredis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except syncredis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """REDIS_URL if set, else a throwaway redis-server on a free port."""
    if os.environ.get("REDIS_URL"):
        yield RedisServer(url=os.environ["REDIS_URL"].rstrip("/"), port=0)
        return
    server = throwaway_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def throwaway_redis(workdir: Path, *extra: str, port: int | None = None) -> RedisServer:
    """A started redis-server on a free port, keeping nothing on disk, with ``extra``
    arguments (``{workdir}`` in them is filled in); skips without redis-server."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on this machine and no REDIS_URL: install redis-server")
    port = port or free_port()
    server = RedisServer(
        url=f"redis://127.0.0.1:{port}/0",
        port=port,
        args=[
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            *(arg.format(workdir=workdir) for arg in extra),
        ],
    )
    server.start()
    return server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test alone may stop and restart."""
    server = throwaway_redis(tmp_path)
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()


@pytest.fixture
def key_prefix(redis_server: RedisServer) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    try:
        client = syncredis.Redis.from_url(redis_server.url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    except syncredis.ConnectionError:
        pass  # a test stopped the server


@pytest.fixture
async def provider() -> AsyncIterator[DevProvider]:
    """The fake OAuth provider, a real HTTP server on loopback."""
    dev = DevProvider(DevProviderSettings(client_secret="cs-" + uuid.uuid4().hex))
    await dev.start()
    yield dev
    await dev.close()
    SECRETS.update(dev.secrets())


def encryption_key() -> str:
    material = base64.b64encode(os.urandom(32)).decode()
    SECRETS.add(material)
    return f"k1:{material}"


def broker_settings(dev: DevProvider, *, api_key_hash: str, **overrides: Any) -> Settings:
    """Settings for a broker talking to ``dev``; ``overrides`` are top-level settings, and
    ``provider={...}`` overrides provider settings (a None value removes that setting)."""
    provider_overrides = overrides.pop("provider", {})
    environ = {"BROKER_ENCRYPTION_KEYS": overrides.pop("encryption_keys", None) or encryption_key()}
    raw: dict[str, Any] = {
        "port": 0,
        "scheduler_enabled": False,  # tests that exercise the scheduler turn it on
        "providers": {
            PROVIDER: {
                key: value
                for key, value in {
                    "token_url": dev.token_url,
                    "authorize_url": dev.authorize_url,
                    "revocation_url": dev.revocation_url,
                    "client_id": dev.settings.client_id,
                    "client_secret": dev.settings.client_secret,
                    "client_auth": dev.settings.client_auth,
                    "scopes": ["public_api"],
                    **provider_overrides,
                }.items()
                if value is not None
            }
        },
        "clients": [
            {
                "name": "svc",
                "key_sha256": api_key_hash,
                "providers": ["*"],
                "permissions": ALL_PERMISSIONS,
            },
        ],
        **overrides,
    }
    return build_settings(raw, environ, base_dir=Path.cwd())


def path(kind: str, user_id: str, provider: str = PROVIDER) -> str:
    """The API path, with the user id percent-encoded as clients must (dots too: a literal
    ``..`` segment is removed by URL normalisation before it reaches any server)."""
    return f"/v1/{kind}/{provider}/{quote(user_id, safe='').replace('.', '%2E')}"


class Clock:
    """Wall-clock time plus an offset that tests move forward instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Broker:
    """A running broker app and an authenticated HTTP client for it."""

    client: TestClient[Any, Any]
    api_key: str
    settings: Settings
    clock: Clock
    app: web.Application

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
        """(status, JSON body or None, headers) for an authenticated request."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        encoded = URL(url, encoded=True)  # paths are percent-encoded already: keep them so
        async with self.client.request(method, encoded, headers=headers, **kwargs) as response:
            body = await response.json(content_type=None) if await response.read() else None
            return response.status, body, response.headers

    async def import_grant(self, user_id: str, **body: Any) -> tuple[int, Any]:
        status, data, _ = await self.call("PUT", path("grants", user_id), json=body)
        return status, data

    async def token(self, user_id: str, min_ttl: int | None = None) -> tuple[int, Any]:
        query = "" if min_ttl is None else f"?min_ttl={min_ttl}"
        status, data, _ = await self.call("GET", path("tokens", user_id) + query)
        return status, data

    async def grant(self, user_id: str) -> tuple[int, Any]:
        status, data, _ = await self.call("GET", path("grants", user_id))
        return status, data


BrokerFactory = Callable[..., Awaitable[Broker]]

# A scheduler that reacts within tens of milliseconds; short locks (a killed replica's grants
# come back quickly), so short timeouts too: a refresh holds its lock through the provider call
# and the write of its result.
FAST_SCHEDULER = {
    "scheduler_enabled": True,
    "scheduler_tick": 0.05,
    "scheduler_lease": 1.0,
    "provider_timeout": 1.0,
    "rotated_write_window": 1.0,
    "redis_timeout": 0.5,
    "lock_ttl": 2.5,
    "retry_base": 0.2,
    "retry_max": 4.0,
}


def metric(broker: Broker, name: str, **labels: str) -> float:
    """A sample of ``broker``'s metrics (0 when it has none yet)."""
    return broker.app[METRICS].registry.get_sample_value(name, labels) or 0.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def make_broker(provider: DevProvider) -> AsyncIterator[BrokerFactory]:
    """Start broker apps against ``provider``: ``await make_broker(redis_url=..., ...)``.

    Apps made with the same ``encryption_keys`` and ``key_prefix`` on one Redis act as replicas.
    With ``port=free_port()`` the app listens on that port, so its ``public_url`` (and the OAuth
    callback built from it) is reachable by a real browser-like client.
    """
    clients: list[TestClient[Any, Any]] = []
    origins: list[str] = []

    async def make(clock: Clock | None = None, **overrides: Any) -> Broker:
        clock = clock or Clock()
        api_key = new_api_key()
        SECRETS.add(api_key)
        SECRETS.add(provider.settings.client_secret)
        settings = broker_settings(provider, api_key_hash=hash_key(api_key), **overrides)
        app = create_app(settings, clock=clock)
        client: TestClient[Any, Any] = TestClient(
            TestServer(app, port=settings.port or None), middlewares=(check_answers,)
        )
        await client.start_server()
        clients.append(client)
        # every answer of this broker, to any client of the run, is checked against its document
        origins.append(str(client.make_url("").origin()))
        CONTRACTS[origins[-1]] = contract(Limits.of(settings))
        return Broker(client, api_key, settings, clock, app)

    yield make
    for origin in origins:
        CONTRACTS.pop(origin, None)
    for client in reversed(clients):
        await client.close()


@pytest.fixture
async def broker(make_broker: BrokerFactory, store_url: dict[str, str]) -> Broker:
    """One broker, on the embedded store and on a real redis-server."""
    return await make_broker(**store_url)


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Run a test on the embedded store and on a real redis-server."""
    if request.param == "memory":
        yield {}
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        yield {"redis_url": server.url, "key_prefix": request.getfixturevalue("key_prefix")}


@dataclass
class Landing:
    """The calling application's page users come back to after an authorization."""

    url: str
    hits: list[URL] = field(default_factory=list)


@pytest.fixture
async def landing() -> AsyncIterator[Landing]:
    """A real HTTP server standing in for the application behind ``redirect_after``."""
    page = Landing("")

    async def anything(request: web.Request) -> web.Response:
        page.hits.append(request.url)
        return web.Response(text="back in the application")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    server = TestServer(app)
    await server.start_server()
    page.url = str(server.make_url("")).rstrip("/")
    yield page
    await server.close()


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A real HTTP client that follows redirects, as the user's browser does."""
    async with aiohttp.ClientSession(middlewares=(check_answers,)) as session:
        yield session


async def start_authorization(
    broker: Broker, user_id: str, redirect_after: str, provider: str = PROVIDER, **body: Any
) -> tuple[int, Any]:
    """``POST /v1/authorizations/{provider}``; the state it returns is a secret for the run."""
    status, data, _ = await broker.call(
        "POST",
        f"/v1/authorizations/{provider}",
        json={"user_id": user_id, "redirect_after": redirect_after, **body},
    )
    if status == 201:
        SECRETS.add(data["state"])
    return status, data


@dataclass
class Journey:
    """Where a browser sent to an authorization URL ended up, and how it got there."""

    status: int
    url: URL
    history: tuple[aiohttp.ClientResponse, ...]

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.url.query_string))

    @property
    def callback_url(self) -> URL:
        """The broker callback URL the provider sent the browser to (holds code and state)."""
        return next(r.url for r in self.history if "/oauth/" in r.url.path)


async def follow(browser: aiohttp.ClientSession, url: str) -> Journey:
    async with browser.get(url) as response:
        await response.read()
        return Journey(response.status, response.url, response.history)


async def connect(
    broker: Broker,
    browser: aiohttp.ClientSession,
    user_id: str,
    redirect_after: str,
    provider: str = PROVIDER,
    **body: Any,
) -> Journey:
    """A user connecting their account: start, then the browser follows every redirect."""
    status, started = await start_authorization(broker, user_id, redirect_after, provider, **body)
    assert status == 201, started
    return await follow(browser, started["authorization_url"])


@contextmanager
def logs_captured(level: str = "debug") -> Iterator[io.StringIO]:
    """Logging configured to a StringIO at ``level``; the previous set-up restored after."""
    root = logging.getLogger()
    handlers, previous = root.handlers[:], root.level
    config = structlog.get_config()
    output = vars(OUTPUT).copy()
    stream = io.StringIO()
    configure_logging("json", level, stream=stream)
    try:
        yield stream
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.configure(**config)
        vars(OUTPUT).update(output)
        root.handlers[:] = handlers
        root.setLevel(previous)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    with logs_captured() as stream:
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]
