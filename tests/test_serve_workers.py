"""``broker serve --workers N``, run as a real process: the workers share one port and one
``/metrics``, and SIGTERM stops them all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

from broker.crypto import new_key
from tests.conftest import RedisServer, free_port

CONFIG = """
host = "127.0.0.1"
port = {port}
redis_url = "{redis_url}"
key_prefix = "{prefix}"

[providers.alfresco]
token_url = "http://127.0.0.1:9/token"
client_id = "broker"

[[clients]]
name = "billing"
key_sha256 = "{digest}"
providers = ["alfresco"]
permissions = ["tokens:read"]
"""
HEALTHZ = re.compile(
    r'^broker_http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$', re.M
)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
        body: bytes = response.read()
        return body


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def served_by(directory: Path, pid: int) -> float:
    """Requests worker ``pid`` counted, from its own multiprocess file."""
    path = directory / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    total = 0.0
    values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
    for key, value, *_ in values:
        if json.loads(key)[1] == "broker_http_requests_total":
            total += value
    return total


def test_two_workers_serve_one_port_aggregate_metrics_and_stop_on_sigterm(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        CONFIG.format(port=port, redis_url=redis_server.url, prefix=key_prefix, digest="ab" * 32),
        encoding="utf-8",
    )
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {"BROKER_ENCRYPTION_KEYS": new_key(), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "stderr.log").open("w+", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--workers", "2", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            workers: list[int] = []
            for _ in range(300):  # both workers up and answering
                workers = children_of(process.pid)
                try:
                    get(f"{base}/readyz")
                    if len(workers) == 2:
                        break
                except OSError:
                    pass
                assert process.poll() is None
                time.sleep(0.1)
            assert len(workers) == 2
            for _ in range(200):  # a connection each: the kernel spreads them over the workers
                get(f"{base}/healthz")
                if all(served_by(metrics_dir, pid) for pid in workers):
                    break
            assert all(served_by(metrics_dir, pid) for pid in workers)
            per_worker = sum(served_by(metrics_dir, pid) for pid in workers)
            text = get(f"{base}/metrics").decode()
            found = HEALTHZ.search(text)
            assert found is not None, text
            aggregated = sum(  # every request so far, whichever worker served it, in one answer
                float(m.group(1))
                for m in re.finditer(r"^broker_http_requests_total\{[^}]*\} (\S+)$", text, re.M)
            )
            assert aggregated == per_worker
            assert "broker_build_info" in text
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        log.seek(0)
        output = log.read()
    assert returncode == 0, output
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], output


def test_workers_need_a_shared_store(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    text = CONFIG.format(port=free_port(), redis_url="", prefix="p", digest="ab" * 32)
    config.write_text(text.replace('redis_url = ""\n', ""), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--workers", "2", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--workers needs a shared store" in result.stderr


def test_a_worker_that_dies_stops_the_others_and_the_supervisor_exits_1(
    tmp_path: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        CONFIG.format(port=port, redis_url=redis_server.url, prefix=key_prefix, digest="ab" * 32),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ENCRYPTION_KEYS"] = new_key()
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--workers", "2", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        workers: list[int] = []
        for _ in range(300):
            workers = children_of(process.pid)
            if len(workers) == 2:
                break
            assert process.poll() is None
            time.sleep(0.1)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert process.wait(timeout=30) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert not Path(f"/proc/{workers[1]}").exists()
