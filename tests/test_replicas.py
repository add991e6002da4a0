"""Three broker processes on one Redis keep 300 rotating grants fresh, and survive a SIGKILL.

This is the product's central promise measured end to end: real `broker serve` processes, a real
redis-server, the provider as a real HTTP server that rejects any reused refresh token, and a
client polling tokens throughout. It takes about 40 seconds.

The kill lands while refreshes are in flight at the provider (held there, unanswered): the case
the leases, locks and fencing exist for. A process killed in the milliseconds after a provider
rotated a token and before the broker stored it loses that token with it, whatever the broker
does; only a provider-side reuse grace period covers that (see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from broker.auth import hash_key, new_api_key
from broker.devprovider import DevProvider
from tests.conftest import SECRETS, RedisServer, encryption_key, free_port, path

GRANTS = 300
TOKEN_TTL = 4
RUN_SECONDS = 30
KILL_AT = 12


@dataclass
class Replica:
    url: str
    process: asyncio.subprocess.Process
    log: Path
    alive: bool = True


@dataclass
class Fleet:
    replicas: list[Replica]
    headers: dict[str, str]
    errors: list[str] = field(default_factory=list)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]


def replica_config(provider: DevProvider, redis_url: str, api_key: str, port: int) -> str:
    return f"""
redis_url = "{redis_url}"
key_prefix = "fleet"
host = "127.0.0.1"
port = {port}
log_format = "json"
log_level = "warning"
scheduler_tick = 0.1
scheduler_lease = 1.0
lock_ttl = 1.0
scheduler_concurrency = 64
provider_concurrency = 64
[providers.dev]
token_url = "{provider.token_url}"
client_id = "{provider.settings.client_id}"
client_secret_env = "DEV_SECRET"
[[clients]]
name = "poller"
key_sha256 = "{hash_key(api_key)}"
providers = ["dev"]
permissions = ["tokens:read", "grants:write", "grants:read"]
"""


async def start_fleet(
    provider: DevProvider, redis: RedisServer, tmp_path: Path, size: int
) -> Fleet:
    api_key = new_api_key()
    keys = encryption_key()
    SECRETS.update({api_key, provider.settings.client_secret})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_ENCRYPTION_KEYS=keys, DEV_SECRET=provider.settings.client_secret)
    replicas = []
    for i in range(size):
        port = free_port()
        config = tmp_path / f"broker-{i}.toml"
        config.write_text(replica_config(provider, redis.url, api_key, port))
        log = tmp_path / f"broker-{i}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "broker",
                "serve",
                "--config",
                str(config),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        replicas.append(Replica(f"http://127.0.0.1:{port}", process, log))
    fleet = Fleet(replicas, {"Authorization": f"Bearer {api_key}"})
    async with aiohttp.ClientSession() as http:
        for replica in replicas:
            for _ in range(200):
                try:
                    async with http.get(replica.url + "/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"replica {replica.url} did not become ready")
    return fleet


async def stop_fleet(fleet: Fleet) -> None:
    for replica in fleet.replicas:
        if replica.process.returncode is None:
            replica.process.send_signal(signal.SIGTERM)
    for replica in fleet.replicas:
        try:
            await asyncio.wait_for(replica.process.wait(), 20)
        except TimeoutError:
            replica.process.kill()
            await replica.process.wait()


async def poll(fleet: Fleet, provider: DevProvider, until: float, counts: list[int]) -> None:
    """A client fetching random users' tokens from random live replicas."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while time.monotonic() < until:
            replica = random.choice(fleet.alive())
            user = f"user-{random.randrange(GRANTS)}"
            try:
                async with http.get(
                    replica.url + path("tokens", user) + "?min_ttl=0", headers=fleet.headers
                ) as response:
                    body = await response.json()
                    status = response.status
            except aiohttp.ClientError as err:
                if replica.alive:
                    fleet.errors.append(f"{user}: {type(err).__name__}")
                continue
            if status != 200:
                fleet.errors.append(f"{user}: HTTP {status} {body.get('code')}")
                continue
            token = body["access_token"]
            expires = provider.access_token_expires_at(token)
            if not token.startswith("at-initial") and (expires is None or expires <= time.time()):
                fleet.errors.append(f"{user}: handed an expired or unknown token")
            counts[0] += 1
            await asyncio.sleep(0.005)


async def test_three_replicas_keep_every_grant_fresh_through_a_sigkill(
    provider: DevProvider, own_redis: RedisServer, tmp_path: Path
) -> None:
    provider.settings.access_token_ttl = TOKEN_TTL
    fleet = await start_fleet(provider, own_redis, tmp_path, size=3)
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(GRANTS):
                body = {
                    "refresh_token": provider.issue_refresh_token(f"user-{i}"),
                    "access_token": f"at-initial-{i}",
                    "expires_in": TOKEN_TTL,
                }
                url = fleet.replicas[i % 3].url + path("grants", f"user-{i}")
                async with http.put(url, json=body, headers=fleet.headers) as response:
                    assert response.status == 201
        started = time.time()
        counts = [0]
        deadline = time.monotonic() + RUN_SECONDS
        pollers = [asyncio.create_task(poll(fleet, provider, deadline, counts)) for _ in range(4)]
        await asyncio.sleep(KILL_AT)
        victim = fleet.replicas[0]
        victim.alive = False  # the load balancer stops routing to it first
        provider.hold()  # refreshes now park at the provider, unanswered
        await provider.wait_for_token_requests(provider.token_requests + 3)
        await asyncio.sleep(0.05)  # answers already on their way are stored (a ms each)
        victim.process.send_signal(signal.SIGKILL)
        await victim.process.wait()
        killed_at = time.time()
        provider.release()
        await asyncio.gather(*pollers)
        finished = time.time()

        assert fleet.errors == [], fleet.errors[:10]
        assert counts[0] > 1000
        assert provider.reused_refresh_tokens == 0
        # From the provider's own records: each grant got its next token before the previous
        # one expired, for the whole run, kill included.
        late: list[tuple[int, float | str]] = []
        for i in range(GRANTS):
            times = [(started, started + TOKEN_TTL), *provider.access_token_times(f"user-{i}")]
            for (_, expired), (issued, _) in itertools.pairwise(times):
                if issued > expired:
                    late.append((i, round(issued - expired, 2)))
            if times[-1][1] < finished:
                late.append((i, "no live token at the end"))
            assert any(issued > killed_at + 2 for issued, _ in times), f"user-{i} not kept"
        assert late == [], late[:10]
        async with aiohttp.ClientSession() as http:
            for i in range(GRANTS):
                url = fleet.replicas[1].url + path("grants", f"user-{i}")
                async with http.get(url, headers=fleet.headers) as response:
                    assert (await response.json())["state"] == "active"
    finally:
        provider.release()  # never leave refreshes parked: the replicas could not drain
        await stop_fleet(fleet)
    for replica in fleet.replicas[1:]:
        assert replica.process.returncode == 0
        assert "Traceback" not in replica.log.read_text()
