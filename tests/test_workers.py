"""``broker serve --workers 2``: real processes on one port, a real redis-server, the dev
provider. Which worker answered a request is read from its log line (each worker marks its lines
with its number and pid); requests go over fresh connections, which the kernel spreads over the
workers' sockets."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from broker.auth import hash_key, new_api_key
from broker.devprovider import DevProvider
from broker.metrics import Metrics
from broker.scheduler import STATS_INTERVAL
from tests.conftest import SECRETS, RedisServer, encryption_key, free_port, path
from tests.fleet import Replica, TomlScalar, replica_config, start_fleet, stop_fleet

TOKEN_ROUTE = "/v1/tokens/{provider}/{user_id}"
EVENT_WAIT = 30.0  # seconds a test waits for a log event before failing
STOP_WAIT = 20.0


def workers(key_prefix: str) -> dict[str, TomlScalar]:
    return {"workers": 2, "log_level": "info", "shutdown_timeout": 5, "key_prefix": key_prefix}


def log_lines(replica: Replica) -> list[dict[str, Any]]:
    lines = []
    for line in replica.log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            lines.append({"event": line[:200]})  # a traceback: shown in assertion messages
    return lines


async def until_logged(replica: Replica, event: str, count: int = 1, **fields: object) -> list[Any]:
    """The first ``count`` lines of ``event`` with these ``fields``, once that many are logged."""
    deadline = time.monotonic() + EVENT_WAIT
    while True:
        found = [
            line
            for line in log_lines(replica)
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]
        if len(found) >= count:
            return found[:count]
        if replica.process.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {count} x {event} {fields}: {replica.events()[-12:]}")
        await asyncio.sleep(0.05)


def ready_pids(replica: Replica) -> dict[int, int]:
    """Worker number -> pid of its latest start that became ready."""
    return {
        line["worker"]: line["pid"]
        for line in log_lines(replica)
        if line.get("event") == "worker.ready"
    }


def token_requests_by_pid(replica: Replica) -> Counter[int]:
    return Counter(
        line["pid"]
        for line in log_lines(replica)
        if line.get("route") == TOKEN_ROUTE and "status" in line  # a request's one line
    )


async def fetch_tokens(replica: Replica, headers: dict[str, str], n: int) -> list[int]:
    """``n`` token fetches, each over a new connection; their statuses."""
    statuses = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(n):
            async with http.get(replica.url + path("tokens", "u-1"), headers=headers) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def scrape(replica: Replica) -> dict[str, float]:
    """Token fetches (``requests``) and hand-outs counted in one scrape, with the gauges of
    active grants (a store-wide figure each worker reads) and of requests in flight."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(replica.url + "/metrics") as response,
    ):
        text = await response.text()
    found = {"requests": 0.0, "handouts": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert "pid" not in sample.labels, f"{sample.name}: a gauge without a mode"
            if sample.name == "broker_http_requests_total":
                if sample.labels["route"] == TOKEN_ROUTE:
                    found["requests"] += sample.value
            elif sample.name == "broker_token_handouts_total":
                found["handouts"] += sample.value
            elif sample.name == "broker_grants" and sample.labels["state"] == "active":
                found["grants_active"] = sample.value
            elif sample.name == "broker_http_requests_in_flight":
                found["in_flight"] = sample.value
    return found


async def import_grant(provider: DevProvider, replica: Replica, headers: dict[str, str]) -> None:
    body = {
        "refresh_token": provider.issue_refresh_token("u-1"),
        "access_token": "at-initial-u-1",
        "expires_in": 3600,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.put(replica.url + path("grants", "u-1"), json=body, headers=headers) as response,
    ):
        assert response.status == 201, await response.text()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_serve_one_port_and_metrics_add_up(
    provider: DevProvider, redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    fleet = await start_fleet(provider, [redis_server.url], tmp_path, workers(key_prefix))
    broker = fleet.replicas[0]
    try:
        await until_logged(broker, "worker.ready", 2)
        pids = ready_pids(broker)
        assert len(set(pids.values())) == 2
        await import_grant(provider, broker, fleet.headers)

        statuses = await fetch_tokens(broker, fleet.headers, 40)

        assert statuses == [200] * 40
        served = token_requests_by_pid(broker)
        assert set(served) == set(pids.values()), served  # both answered some
        assert sum(served.values()) == 40
        for _ in range(4):  # scrapes answered by either worker count both workers' requests
            found = await scrape(broker)
            assert (found["requests"], found["handouts"]) == (40.0, 40.0)
            assert found["in_flight"] == 1.0  # this scrape, in whichever worker answers it
        # Each worker's scheduler counts the grants every STATS_INTERVAL: one grant, whichever
        # counted last, never one per worker.
        seen = set()
        until = time.monotonic() + 2 * STATS_INTERVAL + 1
        while time.monotonic() < until:
            seen.add((await scrape(broker))["grants_active"])
            await asyncio.sleep(0.2)
        assert seen <= {0.0, 1.0}, seen
        assert (await scrape(broker))["grants_active"] == 1.0
        [starting] = await until_logged(broker, "workers.starting")
        assert Path(starting["metrics_dir"]).is_dir()

        broker.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(broker.process.wait(), STOP_WAIT) == 0
    finally:
        await stop_fleet(fleet)
    assert all(gone(pid) for pid in pids.values())
    assert not Path(starting["metrics_dir"]).exists()
    stopped = {line["pid"]: line["exit_code"] for line in log_lines(broker) if "exit_code" in line}
    assert stopped == dict.fromkeys(pids.values(), 0)  # each drained and exited 0
    assert "Traceback" not in broker.log.read_text()


async def test_a_killed_worker_is_replaced_with_the_reloaded_clients_and_its_counts(
    provider: DevProvider, redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    fleet = await start_fleet(provider, [redis_server.url], tmp_path, workers(key_prefix))
    broker = fleet.replicas[0]
    try:
        await until_logged(broker, "worker.ready", 2)
        await import_grant(provider, broker, fleet.headers)
        assert await fetch_tokens(broker, fleet.headers, 10) == [200] * 10
        # SIGHUP: a new client, for every worker, including one started afterwards
        new_key = new_api_key()
        SECRETS.add(new_key)
        assert broker.config is not None
        with broker.config.open("a", encoding="utf-8") as config:
            config.write(
                f'[[clients]]\nname = "late"\nkey_sha256 = "{hash_key(new_key)}"\n'
                'providers = ["dev"]\npermissions = ["tokens:read"]\n'
            )
        broker.process.send_signal(signal.SIGHUP)
        await until_logged(broker, "config.reload", 2, outcome="applied")
        late = {"Authorization": f"Bearer {new_key}"}
        victim, survivor = ready_pids(broker)[0], ready_pids(broker)[1]

        os.kill(victim, signal.SIGKILL)
        await until_logged(broker, "worker.exited", pid=victim, exit_code=-signal.SIGKILL)
        # meanwhile new connections go to the other worker
        assert await fetch_tokens(broker, late, 10) == [200] * 10
        replaced = (await until_logged(broker, "worker.ready", 3))[-1]
        assert replaced["worker"] == 0
        assert replaced["pid"] not in (victim, survivor)
        for _ in range(50):  # until the new worker has answered some (each 1/2 likely)
            assert await fetch_tokens(broker, late, 4) == [200] * 4
            if token_requests_by_pid(broker)[replaced["pid"]] >= 2:
                break
        served = token_requests_by_pid(broker)
        assert served[replaced["pid"]] >= 2, served
        # the dead worker's counts carry on: every fetch so far, whoever answered it
        total = float(sum(served.values()))
        found = await scrape(broker)
        assert (found["requests"], found["handouts"]) == (total, total)
    finally:
        await stop_fleet(fleet)
    assert broker.process.returncode == 0
    assert all(gone(pid) for pid in (victim, survivor, replaced["pid"]))


async def test_workers_do_not_outlive_a_killed_supervisor(
    provider: DevProvider, redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    fleet = await start_fleet(provider, [redis_server.url], tmp_path, workers(key_prefix))
    broker = fleet.replicas[0]
    try:
        await until_logged(broker, "worker.ready", 2)
        pids = ready_pids(broker).values()
        broker.process.send_signal(signal.SIGKILL)
        await broker.process.wait()
        for _ in range(int(STOP_WAIT / 0.05)):  # not our children: polled, not awaited
            if all(gone(pid) for pid in pids):
                break
            await asyncio.sleep(0.05)
        assert all(gone(pid) for pid in pids)
        assert len([e for e in broker.events() if e == "broker.stopping"]) == 2  # they drained
    finally:
        await stop_fleet(fleet)
        [starting] = await until_logged(broker, "workers.starting")
        shutil.rmtree(starting["metrics_dir"])  # a killed supervisor leaves it (documented)


async def test_one_worker_is_one_process_as_before(
    provider: DevProvider,
    redis_server: RedisServer,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where a metrics directory would go
    settings = workers(key_prefix) | {"workers": 1}
    fleet = await start_fleet(provider, [redis_server.url], tmp_path, settings)
    broker = fleet.replicas[0]
    try:
        await import_grant(provider, broker, fleet.headers)
        assert await fetch_tokens(broker, fleet.headers, 3) == [200] * 3
        assert (await scrape(broker))["requests"] == 3.0
        assert list(scratch.iterdir()) == []
    finally:
        await stop_fleet(fleet)
    assert broker.process.returncode == 0
    lines = log_lines(broker)
    assert len([line for line in lines if line.get("route") == TOKEN_ROUTE]) == 3
    assert not any({"worker", "pid"} & line.keys() for line in lines), lines[:3]
    assert not any(line["event"].startswith("workers.") for line in lines)


def test_every_gauge_says_how_the_workers_values_combine() -> None:
    """A gauge left in prometheus-client's default mode (``all``) would show one series per
    worker, labelled by worker, instead of one figure."""
    metrics = Metrics()
    gauges = {name: g for name, g in vars(metrics).items() if isinstance(g, Gauge)}
    assert "http_in_flight" in gauges
    # prometheus-client keeps the mode private; it is the gauge's multiprocess_mode argument.
    modes = {name: g._multiprocess_mode for name, g in gauges.items()}
    assert "all" not in modes.values(), modes


def serve(config: Path, *args: str, env: dict[str, str], wait: float) -> tuple[int, str]:
    """Run ``broker serve`` until it exits by itself; its status and stderr."""
    with subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(config), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            _, stderr = process.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    return process.returncode, stderr


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return env | extra


def test_workers_need_a_shared_store(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(f"port = {free_port()}\n")  # the embedded memory:// store

    status, stderr = serve(config, "--workers", "2", env=clean_env(), wait=30)

    assert status == 2
    assert "configuration error: workers: must be 1 with the embedded memory:// store" in stderr


def test_a_port_in_use_is_one_error(redis_server: RedisServer, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "broker.toml"
        config.write_text(f'redis_url = "{redis_server.url}"\nhost = "127.0.0.1"\nport = {port}\n')
        keys = encryption_key()
        status, stderr = serve(
            config, "--workers", "2", env=clean_env(BROKER_ENCRYPTION_KEYS=keys), wait=30
        )
    assert status == 1
    errors = [line for line in stderr.splitlines() if "cannot_listen" in line]
    assert len(errors) == 1, errors
    assert "Address already in use" in errors[0]


def test_workers_that_keep_failing_at_start_up_stop_the_supervisor(
    provider: DevProvider, redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    # Discovery at a port where nothing listens: each worker fails as it starts.
    gone_provider = f"""
[providers.gone]
discovery_url = "http://127.0.0.1:{free_port()}/.well-known/openid-configuration"
allow_insecure_http = true
client_id = "broker"
client_secret_env = "DEV_SECRET"
"""
    config = tmp_path / "broker.toml"
    config.write_text(
        replica_config(provider, redis_server.url, new_api_key(), free_port(), workers(key_prefix))
        + gone_provider
    )
    env = clean_env(BROKER_ENCRYPTION_KEYS=encryption_key(), DEV_SECRET="s" * 16)
    status, stderr = serve(config, env=env, wait=60)
    lines = stderr.splitlines()
    assert status == 1, lines[-5:]
    events = [json.loads(line) for line in lines if line.startswith("{")]
    started = [e["pid"] for e in events if e["event"] == "worker.started"]
    assert any(e["event"] == "workers.giving_up" for e in events)
    assert not any(e["event"] == "worker.ready" for e in events)
    assert len(started) >= 5  # retried with backoff before giving up
    assert all(gone(pid) for pid in started)
