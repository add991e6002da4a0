"""Grant reads batched per loop turn (broker/batching.py), against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from broker.batching import CommandBatcher, ReadBatcher
from tests.conftest import RedisServer


async def test_concurrent_reads_each_get_their_own_answer(
    redis_server: RedisServer, key_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        for i in range(0, 60, 2):
            await client.hset(f"{key_prefix}:{i}", mapping={"v": str(i), "blob": f"b{i}"})
        await client.set(f"{key_prefix}:wrong", "a string, not a hash")
        batcher = ReadBatcher(client, ("v", "blob"))
        keys = [f"{key_prefix}:{i}" for i in range(60)] + [f"{key_prefix}:wrong"]
        answers = await asyncio.gather(*(batcher.hmget(k) for k in keys), return_exceptions=True)
        for i in range(60):
            assert answers[i] == (
                [str(i).encode(), f"b{i}".encode()] if i % 2 == 0 else [None, None]
            )
        assert isinstance(answers[60], ResponseError)  # only the bad key's caller fails
    finally:
        await client.aclose()


async def test_commands_sent_together_get_their_replies_in_order_beside_other_callers(
    redis_server: RedisServer, key_prefix: str
) -> None:
    """``execute_many`` (a grant's index updates): its replies in its own order, a failed
    command's error in its place, other callers of the same loop turn unaffected."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(f"{key_prefix}:s", "a string")
        batcher = CommandBatcher(client)
        together = batcher.execute_many(
            [
                ("ZADD", f"{key_prefix}:z", 5, "m"),
                ("SADD", f"{key_prefix}:s", "m"),  # wrong type: fails alone
                ("ZSCORE", f"{key_prefix}:z", "m"),
            ]
        )
        alone = batcher.execute("SET", f"{key_prefix}:other", "x")
        replies, other = await asyncio.gather(together, alone)
        assert replies[0] == 1
        assert float(replies[2]) == 5.0
        assert isinstance(replies[1], ResponseError)
        assert other is True
        assert await client.get(f"{key_prefix}:other") == b"x"
    finally:
        await client.delete(f"{key_prefix}:z", f"{key_prefix}:s", f"{key_prefix}:other")
        await client.aclose()


async def test_a_lost_connection_fails_every_read_in_the_batch_then_reads_resume(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        await client.hset("k", mapping={"v": "1", "blob": "b"})
        batcher = ReadBatcher(client, ("v", "blob"))
        assert await batcher.hmget("k") == [b"1", b"b"]
        own_redis.stop()
        answers = await asyncio.gather(
            *(batcher.hmget("k") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(a, RedisConnectionError | OSError) for a in answers), answers
        own_redis.start()
        await client.hset("k", mapping={"v": "2", "blob": "c"})
        assert await batcher.hmget("k") == [b"2", b"c"]
    finally:
        await client.aclose()


async def test_a_cancelled_reader_leaves_the_others_their_answers(
    redis_server: RedisServer, key_prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.hset(f"{key_prefix}:c", mapping={"v": "7", "blob": "x"})
        batcher = ReadBatcher(client, ("v", "blob"))
        gone = asyncio.create_task(batcher.hmget(f"{key_prefix}:c"))
        kept = asyncio.create_task(batcher.hmget(f"{key_prefix}:c"))
        await asyncio.sleep(0)
        gone.cancel()
        assert await kept == [b"7", b"x"]
        with pytest.raises(asyncio.CancelledError):
            await gone
    finally:
        await client.aclose()


async def test_scripts_go_by_digest_and_are_loaded_again_when_redis_forgot_them(
    own_redis: RedisServer,
) -> None:
    """A restarted or failed-over Redis knows no scripts: NOSCRIPT means the script did not
    run, so it is loaded and run once, for every caller in the batch."""
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        counter = client.register_script("return redis.call('INCR', KEYS[1])")
        batcher = CommandBatcher(client)
        key = "counter"
        assert await batcher.script(counter, [key], []) == 1
        await client.script_flush()
        answers = await asyncio.gather(*(batcher.script(counter, [key], []) for _ in range(5)))
        assert sorted(answers) == [2, 3, 4, 5, 6]
        assert await client.get(key) == b"6"
    finally:
        await client.aclose()
