"""Redis going away and SIGTERM: clear errors, nothing lost, a clean exit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from broker.auth import hash_key, new_api_key
from broker.devprovider import DevProvider
from tests.conftest import (
    SECRETS,
    Broker,
    BrokerFactory,
    RedisServer,
    encryption_key,
    free_port,
    path,
)


async def test_redis_down_is_a_clear_503_and_recovers(
    make_broker: BrokerFactory, own_redis: RedisServer
) -> None:
    broker = await make_broker(redis_url=own_redis.url, redis_timeout=0.5)
    await broker.import_grant("u", refresh_token="rt", access_token="at", expires_in=600)
    own_redis.stop()
    status, body, headers = await broker.call("GET", path("tokens", "u"))
    assert status == 503
    assert body["code"] == "store_unavailable"
    assert int(headers["Retry-After"]) >= 1
    status, ready, _ = await broker.call("GET", "/readyz")
    assert status == 503
    assert ready["checks"]["redis"]["ok"] is False
    assert (await broker.call("GET", "/healthz"))[0] == 200
    status, body = await broker.import_grant("u", refresh_token="rt2")
    assert status == 503
    own_redis.start()  # an empty Redis: the same broker reconnects by itself
    assert (await broker.call("GET", "/readyz"))[0] == 200
    status, _ = await broker.import_grant(
        "u", refresh_token="rt3", access_token="at3", expires_in=600
    )
    assert status == 201
    assert (await broker.token("u"))[1]["access_token"] == "at3"
    metrics = await broker.client.get("/metrics")
    assert "broker_redis_errors_total" in await metrics.text()


async def test_sigterm_finishes_the_request_in_flight_then_exits_0(
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
    tmp_path: Path,
    make_broker: BrokerFactory,
) -> None:
    api_key = new_api_key()
    keys = encryption_key()
    SECRETS.update({api_key, provider.settings.client_secret})
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(f"""
redis_url = "{redis_server.url}"
key_prefix = "{key_prefix}"
host = "127.0.0.1"
port = {port}
log_format = "json"
[providers.dev]
token_url = "{provider.token_url}"
revocation_url = "{provider.revocation_url}"
client_id = "{provider.settings.client_id}"
client_secret_env = "DEV_SECRET"
[[clients]]
name = "svc"
key_sha256 = "{hash_key(api_key)}"
providers = ["dev"]
permissions = ["tokens:read", "grants:write", "grants:read"]
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_ENCRYPTION_KEYS=keys, DEV_SECRET=provider.settings.client_secret)
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "broker", "serve", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(base + "/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("broker did not start")
            body = {
                "refresh_token": provider.issue_refresh_token("u"),
                "access_token": "at",
                "expires_in": 5,
            }
            async with http.put(base + path("grants", "u"), json=body, headers=headers) as r:
                assert r.status == 201
            provider.hold()
            in_flight = asyncio.create_task(http.get(base + path("tokens", "u"), headers=headers))
            await provider.wait_for_token_requests(1)
            process.send_signal(signal.SIGTERM)
            for _ in range(200):  # the broker has begun its shutdown
                if b"broker.stopping" in log_path.read_bytes():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("broker did not start shutting down")
            provider.release()
            response = await in_flight
            assert response.status == 200
            token = await response.json()
            assert provider.access_token_expires_at(token["access_token"]) is not None
            response.release()
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()
    # The rotated refresh token reached Redis before the exit: a new broker can use it.
    successor = await make_broker(
        redis_url=redis_server.url, key_prefix=key_prefix, encryption_keys=keys
    )
    successor.clock.advance(3600)
    status, _ = await successor.token("u")
    assert status == 200
    assert provider.reused_refresh_tokens == 0
    assert "Traceback" not in log_path.read_text()


async def test_readiness_fails_as_soon_as_shutdown_begins(broker: Broker) -> None:
    assert (await broker.call("GET", "/readyz"))[0] == 200
    await broker.app.shutdown()  # what SIGTERM runs first (on_shutdown)
    status, ready, _ = await broker.call("GET", "/readyz")
    assert status == 503
    assert ready["checks"]["shutdown"]["ok"] is False
    assert (await broker.call("GET", "/healthz"))[0] == 200  # alive while it drains
