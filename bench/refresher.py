"""Benchmark the background refresher; prints figures, asserts nothing.

1. Throughput: N grants all due at once, refreshed by one broker process against the dev
   provider running in another process; refreshes per second until all are done, and the CPU
   per refresh of the broker process and of the dev provider, each on its own.
2. Idle cost: M grants stored, none due for an hour; CPU seconds per second used by the broker
   process (and by redis-server) while its scheduler runs.

    python bench/refresher.py                       # 2,000 due grants, 1,000,000 idle grants
    python bench/refresher.py --due 500 --idle 100000
    python bench/refresher.py --due 2000 --idle 0    # throughput only

Starts a throwaway redis-server (needs Debian's redis-server) unless --redis-url is given;
with --redis-url it uses key prefix "bench" and deletes its keys afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from aiohttp import web
from seeding import seed  # bench/, beside this file

from broker.api import KEYRING, METRICS, STORE
from broker.app import create_app
from broker.config import Settings, build_settings
from broker.crypto import new_key
from broker.devprovider import DevProvider, DevProviderSettings
from broker.logs import configure_logging
from broker.models import Grant

PREFIX = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_provider(conn: Connection, port: int, tokens: int) -> None:
    """The dev provider in its own process; sends back the refresh tokens it minted."""

    async def main() -> None:
        provider = DevProvider(DevProviderSettings(access_token_ttl=3600))
        await provider.start(port=port)
        conn.send([provider.issue_refresh_token(f"user-{i}") for i in range(tokens)])
        await asyncio.Event().wait()

    asyncio.run(main())


def settings_for(redis_url: str, provider_url: str, concurrency: int) -> Settings:
    return build_settings(
        {
            "redis_url": redis_url,
            "key_prefix": PREFIX,
            "port": 0,
            "log_level": "error",
            "scheduler_concurrency": concurrency,
            "provider_concurrency": concurrency,
            "providers": {
                "dev": {
                    "token_url": f"{provider_url}/token",
                    "client_id": "broker-dev",
                    "client_secret": "dev-secret-change-me",
                }
            },
        },
        {"BROKER_ENCRYPTION_KEYS": new_key()},
        base_dir=Path.cwd(),
    )


async def throughput(redis_url: str, due: int, concurrency: int) -> tuple[float, float]:
    """Refreshes per second and CPU seconds per refresh of one broker process (the dev
    provider's CPU per refresh printed too: on a small machine it bounds the rate)."""
    port = free_port()
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=run_provider, args=(child, port, due), daemon=True)
    process.start()
    tokens: list[str] = parent.recv()
    settings = settings_for(redis_url, f"http://127.0.0.1:{port}", concurrency)
    loader = web.AppRunner(create_app(settings.model_copy(update={"scheduler_enabled": False})))
    await loader.setup()
    store = loader.app[STORE]
    now = time.time()
    for i, token in enumerate(tokens):  # due an hour ago: all claimable at once
        grant = Grant(
            provider="dev",
            user_id=f"user-{i}",
            refresh_token=token,
            next_refresh_at=now - 3600,
            version=1,
            created_at=now,
            updated_at=now,
        )
        await store.write(grant, 0)
    await loader.cleanup()
    app = create_app(settings)
    runner = web.AppRunner(app)
    assert process.pid is not None
    started = time.perf_counter()
    cpu, provider_cpu = time.process_time(), process_cpu(process.pid)
    await runner.setup()  # the scheduler starts claiming here
    registry = app[METRICS].registry
    while True:
        done = (
            registry.get_sample_value(
                "broker_refreshes_total",
                {"provider": "dev", "outcome": "success", "trigger": "scheduled"},
            )
            or 0.0
        )
        if done >= due:
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    used = time.process_time() - cpu
    provider_used = process_cpu(process.pid) - provider_cpu
    print(
        f"throughput: {due} refreshes in {elapsed:.2f} s = {due / elapsed:,.0f} refreshes/s "
        f"(scheduler_concurrency={concurrency}); CPU per refresh: broker "
        f"{used / due * 1000:.2f} ms ({used / elapsed:.2f} s/s), dev provider in its own "
        f"process {provider_used / due * 1000:.2f} ms ({provider_used / elapsed:.2f} s/s)"
    )
    await runner.cleanup()
    process.terminate()
    return due / elapsed, used / due


async def idle_cost(redis_url: str, grants: int, seconds: float) -> None:
    settings = settings_for(redis_url, "http://127.0.0.1:9", 32)
    app = create_app(settings.model_copy(update={"scheduler_enabled": False}))
    runner = web.AppRunner(app)
    await runner.setup()
    url = urlsplit(redis_url)  # the records and index entries as writes leave them, pipelined
    started = time.perf_counter()
    seed(
        url.port or 6379,
        app[KEYRING],
        grants,
        time.time(),
        host=url.hostname or "127.0.0.1",
        prefix=PREFIX,
    )
    print(f"idle: stored {grants:,} grants in {time.perf_counter() - started:.0f} s")
    await runner.cleanup()

    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()  # the scheduler starts here
    client = aioredis.Redis.from_url(redis_url)
    info = await client.info("cpu")
    redis_cpu = info["used_cpu_user"] + info["used_cpu_sys"]
    cpu = time.process_time()
    await asyncio.sleep(seconds)
    used = time.process_time() - cpu
    info = await client.info("cpu")
    redis_used = info["used_cpu_user"] + info["used_cpu_sys"] - redis_cpu
    print(
        f"idle: {grants:,} grants stored, none due, scheduler running for {seconds:.0f} s: "
        f"broker {used / seconds * 1000:.1f} ms CPU per second, "
        f"redis-server {redis_used / seconds * 1000:.1f} ms CPU per second"
    )
    await client.aclose()
    await runner.cleanup()


async def cleanup(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    async for key in client.scan_iter(match=f"{PREFIX}:*", count=5000):
        await client.unlink(key)
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--due", type=int, default=2000, help="grants for the throughput run")
    parser.add_argument(
        "--idle", type=int, default=1_000_000, help="grants for the idle run (0: none)"
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", help="default: a throwaway redis-server")
    args = parser.parse_args()
    configure_logging("console", "warning")
    server = None
    url = args.redis_url
    if url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("needs redis-server (apt-get install redis-server) or --redis-url")
        port = free_port()
        workdir = tempfile.mkdtemp()
        server = subprocess.Popen(  # noqa: S603
            [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
    try:
        asyncio.run(throughput(url, args.due, args.concurrency))
        asyncio.run(cleanup(url))
        if args.idle:
            asyncio.run(idle_cost(url, args.idle, args.idle_seconds))
    finally:
        asyncio.run(cleanup(url))
        if server is not None:
            server.terminate()


if __name__ == "__main__":
    main()
