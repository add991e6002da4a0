"""``SIGHUP`` to a real ``broker serve`` process while requests run: a removed key stops working
at once and nothing else fails; a file that does not validate is refused and the running
clients stay; settings that cannot change live are reported, not applied."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from broker.auth import hash_key
from broker.devprovider import DevProvider
from tests.clients import api_key, bearer
from tests.conftest import RedisServer, path
from tests.fleet import Replica, start_fleet, stop_fleet
from tests.security.test_client_limits import counted

WAIT_POLLS = 200
WAIT_POLL = 0.05
REQUESTS_BETWEEN_STEPS = 20


def victim(*keys: str) -> str:
    hashes = ", ".join(f'"{hash_key(key)}"' for key in keys)
    return f"""
[[clients]]
name = "victim"
key_sha256 = [{hashes}]
providers = ["dev"]
permissions = ["tokens:read"]
"""


async def until(check: Callable[[], Any], what: str) -> None:
    """Poll ``check`` (a coroutine function) until it returns true, bounded."""
    for _ in range(WAIT_POLLS):
        if await check():
            return
        await asyncio.sleep(WAIT_POLL)
    raise AssertionError(f"timed out waiting for {what}")


def audit_events(replica: Replica, event: str) -> list[dict[str, Any]]:
    found = []
    for line in replica.log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


async def test_sighup_revokes_a_key_while_requests_run_and_refuses_a_bad_file(
    provider: DevProvider, redis_server: RedisServer, tmp_path: Path
) -> None:
    old, new = api_key(), api_key()
    fleet = await start_fleet(
        provider,
        [redis_server.url],
        tmp_path,
        {"key_prefix": f"reload-{tmp_path.name}"},
        extra_toml=victim(old, new),
    )
    [replica] = fleet.replicas
    assert replica.config is not None
    original = replica.config.read_text(encoding="utf-8")
    statuses: dict[str, list[int]] = {"poller": [], "new": [], "old": []}
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as http:
            url = replica.url + path("tokens", "u-1")
            refresh_token = provider.issue_refresh_token("u-1")
            async with http.put(
                replica.url + path("grants", "u-1"),
                headers=fleet.headers,
                json={"refresh_token": refresh_token},
            ) as response:
                assert response.status == 201

            async def requests(name: str, headers: dict[str, str]) -> None:
                while not stop.is_set():
                    try:
                        async with http.get(url, headers=headers) as response:
                            statuses[name].append(response.status)
                    except aiohttp.ClientError:
                        statuses[name].append(-1)

            async def reloads(outcome: str) -> float:
                async with http.get(replica.url + "/metrics") as response:
                    text = await response.text()
                return counted(text, f'broker_config_reloads_total{{outcome="{outcome}"}}')

            async def progressed(counts: dict[str, int]) -> bool:
                return all(len(statuses[n]) >= counts[n] + REQUESTS_BETWEEN_STEPS for n in statuses)

            loops = [
                asyncio.create_task(requests("poller", fleet.headers)),
                asyncio.create_task(requests("new", bearer(new))),
                asyncio.create_task(requests("old", bearer(old))),
            ]
            try:
                await until(lambda: progressed(dict.fromkeys(statuses, 0)), "requests")
                # The old key removed, and a setting that cannot change live changed too.
                replica.config.write_text(
                    "default_min_ttl = 45\n" + original.replace(victim(old, new), victim(new))
                )
                replica.process.send_signal(signal.SIGHUP)
                await until(lambda: reloads("applied"), "the reload")
                mark = {n: len(s) for n, s in statuses.items()}
                await until(lambda: progressed(mark), "requests after the reload")
                # A file that does not validate: refused, the running clients stay.
                replica.config.write_text(
                    original.replace(victim(old, new), victim(new).replace(hash_key(new), "xyz"))
                )
                replica.process.send_signal(signal.SIGHUP)
                await until(lambda: reloads("refused"), "the refusal")
                mark = {n: len(s) for n, s in statuses.items()}
                await until(lambda: progressed(mark), "requests after the refusal")
            finally:
                stop.set()
                await asyncio.gather(*loops)
            assert await reloads("applied") == 1
    finally:
        await stop_fleet(fleet)

    assert set(statuses["poller"]) == {200}
    assert set(statuses["new"]) == {200}
    served = statuses["old"].index(401)
    assert served > 0
    assert statuses["old"] == [200] * served + [401] * (len(statuses["old"]) - served)

    [applied, refused] = audit_events(replica, "config.reload")
    assert applied["outcome"] == "applied"
    assert applied["clients_changed"] == ["victim"]
    assert applied["clients_added"] == applied["clients_removed"] == []
    assert applied["needs_restart"] == ["default_min_ttl"]
    assert refused["outcome"] == "refused"
    assert refused["setting"] == "clients.victim.key_sha256"
    [restart] = audit_events(replica, "config.needs_restart")
    assert restart["settings"] == ["default_min_ttl"]
    log = replica.log.read_text(encoding="utf-8")
    assert old not in log
    assert new not in log
