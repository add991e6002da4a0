"""Real ``broker serve`` processes on one Redis, for tests that need whole replicas: kill them,
freeze them (SIGSTOP), or cut them off from Redis.

Every replica of a fleet shares the encryption keys, key prefix and one API key; each gets its
own TOML file, port and log file, and may reach Redis by its own URL (through a fault proxy).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from broker.auth import hash_key, new_api_key
from broker.devprovider import DevProvider
from tests.conftest import SECRETS, encryption_key, free_port

READY_POLLS = 200  # x READY_POLL seconds for a replica to answer /readyz
READY_POLL = 0.05
STOP_TIMEOUT = 20.0  # seconds a replica has to drain after SIGTERM before it is killed

TomlScalar = str | int | float | bool


@dataclass
class Replica:
    url: str
    process: asyncio.subprocess.Process
    log: Path
    alive: bool = True
    config: Path | None = None

    def events(self) -> list[str]:
        """The ``event`` of each JSON log line so far (for assertion messages)."""
        found = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                found.append(str(json.loads(line).get("event")))
            except (ValueError, AttributeError):
                found.append(line[:120])  # not JSON: a traceback or a print
        return found


@dataclass
class Fleet:
    replicas: list[Replica]
    headers: dict[str, str]
    errors: list[str] = field(default_factory=list)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]


def _toml(value: TomlScalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for what tests put here
    return repr(value)


def replica_config(
    provider: DevProvider,
    redis_url: str,
    api_key: str,
    port: int,
    settings: Mapping[str, TomlScalar],
    tables: str = "",
    provider_settings: Mapping[str, TomlScalar] | None = None,
) -> str:
    """A TOML configuration for one replica; ``settings`` are extra top-level settings,
    ``provider_settings`` more settings of the dev provider's table, ``tables`` more TOML
    tables (``[[webhooks]]``)."""
    top: dict[str, TomlScalar] = {
        "redis_url": redis_url,
        "key_prefix": "fleet",
        "host": "127.0.0.1",
        "port": port,
        "log_format": "json",
        "log_level": "warning",
        **settings,
    }
    lines = [f"{name} = {_toml(value)}" for name, value in top.items()]
    provider_lines = "\n".join(
        f"{name} = {_toml(value)}" for name, value in (provider_settings or {}).items()
    )
    lines.append(f"""
[providers.dev]
token_url = "{provider.token_url}"
client_id = "{provider.settings.client_id}"
client_secret_env = "DEV_SECRET"
{provider_lines}
[[clients]]
name = "poller"
key_sha256 = "{hash_key(api_key)}"
providers = ["dev"]
permissions = ["tokens:read", "grants:write", "grants:read"]
""")
    lines.append(tables)
    return "\n".join(lines)


async def start_fleet(
    provider: DevProvider,
    redis_urls: Sequence[str],
    tmp_path: Path,
    settings: Mapping[str, TomlScalar],
    *,
    extra_toml: str = "",
    provider_settings: Mapping[str, TomlScalar] | None = None,
) -> Fleet:
    """One ready replica per Redis URL (the same server, maybe by different routes);
    ``extra_toml`` (more tables, e.g. ``[[clients]]``) is appended to each configuration."""
    api_key = new_api_key()
    keys = encryption_key()
    SECRETS.update({api_key, provider.settings.client_secret})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_ENCRYPTION_KEYS=keys, DEV_SECRET=provider.settings.client_secret)
    fleet = Fleet([], {"Authorization": f"Bearer {api_key}"})
    try:
        for i, redis_url in enumerate(redis_urls):
            port = free_port()
            config = tmp_path / f"broker-{i}.toml"
            config.write_text(
                replica_config(
                    provider, redis_url, api_key, port, settings, extra_toml, provider_settings
                )
            )
            log = tmp_path / f"broker-{i}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "broker", "serve", "--config", str(config),
                    env=env, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            fleet.replicas.append(Replica(f"http://127.0.0.1:{port}", process, log, config=config))
        async with aiohttp.ClientSession() as http:
            for replica in fleet.replicas:
                await _until_ready(http, replica)
    except BaseException:
        await stop_fleet(fleet)
        raise
    return fleet


async def _until_ready(http: aiohttp.ClientSession, replica: Replica) -> None:
    for _ in range(READY_POLLS):
        try:
            async with http.get(replica.url + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(READY_POLL)
    raise AssertionError(f"replica {replica.url} did not become ready: {replica.events()[-5:]}")


async def stop_fleet(fleet: Fleet) -> None:
    """SIGCONT (a frozen replica cannot drain), SIGTERM, then kill whatever outlives the wait."""
    for replica in fleet.replicas:
        if replica.process.returncode is None:
            replica.process.send_signal(signal.SIGCONT)
            replica.process.send_signal(signal.SIGTERM)
    for replica in fleet.replicas:
        try:
            await asyncio.wait_for(replica.process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            replica.process.kill()
            await replica.process.wait()
