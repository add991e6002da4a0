"""The fault-injecting proxy against a real redis-server: the faults are the ones it claims."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.conftest import RedisServer
from tests.faults import TcpProxy

QUICK_TIMEOUT = 0.3  # seconds a client through a blackhole waits before giving up
SILENCE = 0.2  # how long "nothing arrives" is watched for


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[TcpProxy]:
    target = urlsplit(redis_server.url)
    async with await TcpProxy.start(target.hostname or "127.0.0.1", target.port or 6379) as p:
        yield p


@pytest.fixture
async def direct(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client that bypasses the proxy: the server's own view."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def through(proxy: TcpProxy, redis_server: RedisServer, **kwargs: Any) -> aioredis.Redis:
    """A client via the proxy that never retries, so each fault shows as its own error."""
    target = urlsplit(redis_server.url)
    db = int(target.path.strip("/") or 0)
    return aioredis.Redis.from_url(
        proxy.url_for_redis(db),
        password=target.password,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=QUICK_TIMEOUT,
        socket_connect_timeout=QUICK_TIMEOUT,
        **kwargs,
    )


async def test_commands_pass_through_the_proxy(
    proxy: TcpProxy, redis_server: RedisServer, direct: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:k"
    client = through(proxy, redis_server)
    try:
        assert await client.set(key, b"v")
        assert await client.get(key) == b"v"
    finally:
        await client.aclose()
    assert await direct.get(key) == b"v"
    assert proxy.connections == 1
    assert proxy.url_for_redis(3) == f"redis://127.0.0.1:{proxy.port}/3"


async def test_a_blackhole_times_clients_out_until_heal(
    proxy: TcpProxy, redis_server: RedisServer, direct: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:k"
    before, during, after = (through(proxy, redis_server) for _ in range(3))
    try:
        assert await before.set(key, b"v")
        proxy.blackhole()
        with pytest.raises(RedisTimeoutError):
            await before.get(key)  # an existing connection: silence
        with pytest.raises(RedisTimeoutError):
            await during.ping()  # a new connection: accepted, then silence
        assert proxy.connections == 2
        assert await direct.get(key) == b"v"  # the server itself is fine
        proxy.heal()
        assert await after.get(key) == b"v"
        assert await before.get(key) == b"v"  # reconnects
    finally:
        for client in (before, during, after):
            await client.aclose()


async def test_heal_closes_the_connections_the_blackhole_held(proxy: TcpProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"PING\r\n")
        assert await asyncio.wait_for(reader.readline(), 1) == b"+PONG\r\n"
        proxy.blackhole()
        writer.write(b"PING\r\n")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), SILENCE)
        proxy.heal()
        # Closed, with nothing from the partition let through: the stream state is unknown.
        assert await asyncio.wait_for(reader.read(), 1) == b""
    finally:
        writer.close()


async def test_a_dropped_reply_leaves_the_command_executed(
    proxy: TcpProxy, redis_server: RedisServer, direct: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:counter"
    client = through(proxy, redis_server)
    try:
        assert await client.ping()
        proxy.drop_reply_once(b"INCR")
        with pytest.raises(RedisConnectionError):
            await client.incr(key)
        await proxy.wait_dropped(1, timeout=1)
        assert proxy.dropped_replies == 1
        assert await direct.get(key) == b"1"  # it ran: only the answer was lost
        assert await client.incr(key) == 2  # once: the next reply arrives
        assert proxy.dropped_replies == 1
    finally:
        await client.aclose()
