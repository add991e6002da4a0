"""Benchmark the token hot path against an aiohttp hello-world in the same run; prints a table,
asserts nothing.

Starts a throwaway redis-server, the dev provider, ``broker serve`` and ``bench/hello.py`` (the
hello-world, and unless ``--no-floor`` the floor of a token request: ``hello.py --shaped``) as
processes of their own, seeds grants straight into Redis (pipelined, encrypted as broker writes
them), then runs wrk with ``bench/tokens.lua`` (random seeded users) against the hello-world,
the floor and the token endpoint, in turn, ``--rounds`` times. Needs ``redis-server`` and ``wrk``
(``apt-get install -y redis-server wrk``).

    python bench/run.py                          # 20,000 grants, 3 rounds of 10 s
    python bench/run.py --grants 1000000         # seeding a million takes well under a minute
    python bench/run.py --refreshes 2000         # and the refresher (bench/refresher.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families
from seeding import PROVIDER, USER, redis_bytes_per_grant, seed  # bench/, beside this file

from broker.auth import hash_key, new_api_key
from broker.config import parse_encryption_keys
from broker.crypto import KeyRing, new_key
from broker.logs import configure_logging

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK = shutil.which("wrk") or "wrk"
FLOOR = "floor (no broker work)"

CONFIG = """
host = "127.0.0.1"
port = {port}
redis_url = "redis://127.0.0.1:{redis_port}/0"
log_format = "json"
log_level = "{log_level}"
token_cache_seconds = {token_cache_seconds}
record_format = {record_format}

[providers.dev]
token_url = "http://127.0.0.1:{provider_port}/token"
client_id = "broker-dev"
client_secret = "dev-secret-change-me"

[[clients]]
name = "bench"
key_sha256 = "{digest}"
providers = ["dev"]
permissions = ["tokens:read"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Load:
    """One wrk run's figures."""

    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: float  # CPU seconds per second of the server process


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and of its children still running (``serve --workers``)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and of its children."""
    total = 0.0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if status.parent.name == str(pid) or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    return total


def wrk(
    target: str, url: str, pid: int, env: dict[str, str], seconds: int, connections: int
) -> Load:
    cpu = cpu_seconds(pid)
    result = subprocess.run(  # noqa: S603
        [
            WRK,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(HERE / "tokens.lua"),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    used = cpu_seconds(pid) - cpu
    line = next(x for x in result.stdout.splitlines() if x.startswith("BENCH "))
    figures = json.loads(line[len("BENCH ") :])
    elapsed = figures["duration_us"] / 1e6
    errors = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Load(
        target,
        figures["requests"] / elapsed,
        figures["p50_us"] / 1000,
        figures["p99_us"] / 1000,
        errors,
        used / elapsed,
    )


class Processes:
    """Child processes, stopped (SIGTERM, then SIGKILL) in reverse order on exit."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]  # noqa: S603
        self.children.append(process)
        return process  # type: ignore[no-any-return]

    def stop(self) -> None:
        for process in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.children):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def wait_http(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not answer {url}")


def check_token(port: int, api_key: str) -> None:
    """One token request answered as the benchmark expects, before any load: a port taken by
    another process, or a broker answering errors, would make the figures meaningless."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/tokens/{PROVIDER}/{USER}0",
        headers={"Authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
        body = json.load(response)
    if "access_token" not in body:
        raise SystemExit(f"broker answered {sorted(body)}, not a token")


@contextmanager
def redis_server(workdir: Path, procs: Processes) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("needs redis-server: apt-get install -y redis-server")
    port = free_port()
    procs.start(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield port
    client.close()


def cache_hit_share(port: int) -> float:
    """The share of token requests broker answered from its grant cache (from /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "broker_grant_cache_lookups_total":
                found[sample.labels["result"]] += sample.value
    total = found["hit"] + found["miss"]
    return found["hit"] / total if total else 0.0


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grants", type=int, default=20_000, help="grants seeded (users)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="hello-world/broker pairs")
    parser.add_argument(
        "--warm-up", type=int, default=2, help="seconds of unmeasured load before each run"
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure bench/hello.py --shaped (a token request without broker's work)",
    )
    parser.add_argument("--workers", type=int, default=1, help="broker serve --workers N")
    parser.add_argument("--log-level", default="info", help="broker's log_level (default info)")
    parser.add_argument(
        "--token-cache-seconds", type=float, default=5.0, help="broker's token_cache_seconds"
    )
    parser.add_argument(
        "--record-format", type=int, default=2, choices=(1, 2), help="grant record format"
    )
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument(
        "--refreshes", type=int, default=0, help="also run bench/refresher.py's throughput"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run broker under cProfile (FILE.prof) or pyinstrument (FILE.txt, FILE.html)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="print the broker log's path")
    args = parser.parse_args()
    if not Path(WRK).is_absolute():
        raise SystemExit("needs wrk: apt-get install -y wrk")

    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    procs = Processes()
    try:
        with redis_server(workdir, procs) as redis_port:
            run(args, workdir, procs, redis_port)
    finally:
        procs.stop()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path, procs: Processes, redis_port: int) -> None:
    encryption_key = new_key()
    api_key = new_api_key()
    provider_port, broker_port, hello_port = free_port(), free_port(), free_port()
    floor_port = free_port()
    if len({provider_port, broker_port, hello_port, floor_port, redis_port}) < 5:
        raise SystemExit("two services drew the same free port: run again")
    client = redis.Redis(port=redis_port)
    used_before = int(client.info("memory")["used_memory"])
    client.close()
    keyring = KeyRing(parse_encryption_keys(encryption_key))
    seconds = seed(redis_port, keyring, args.grants, time.time(), args.record_format)
    print(f"seeded {args.grants:,} grants in {seconds:.1f} s ({args.grants / seconds:,.0f}/s)")

    config = workdir / "broker.toml"
    config.write_text(
        CONFIG.format(
            port=broker_port,
            redis_port=redis_port,
            provider_port=provider_port,
            digest=hash_key(api_key),
            log_level=args.log_level,
            token_cache_seconds=args.token_cache_seconds,
            record_format=args.record_format,
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_ENCRYPTION_KEYS"] = encryption_key
    provider = procs.start(
        [sys.executable, "-m", "broker.devprovider", "--port", str(provider_port)],
        stdout=subprocess.DEVNULL,
        env=env,
    )
    log_path = workdir / "broker.log"
    profiling = []
    if args.profile and args.profile.endswith((".txt", ".html")):  # pip install pyinstrument
        renderer = "html" if args.profile.endswith(".html") else "text"
        profiling = ["-m", "pyinstrument", "--show-all", "-r", renderer, "-o", args.profile]
    elif args.profile:
        profiling = ["-m", "cProfile", "-o", args.profile]
    with log_path.open("wb") as log:
        broker = procs.start(
            [
                sys.executable,
                *profiling,
                "-m",
                "broker",
                "serve",
                "--config",
                str(config),
                *(["--workers", str(args.workers)] if args.workers != 1 else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
    hello = procs.start(
        [sys.executable, str(HERE / "hello.py"), "--port", str(hello_port)],
        stdout=subprocess.DEVNULL,
        env=env,
    )
    wait_http(
        f"http://127.0.0.1:{provider_port}/.well-known/openid-configuration", provider, "provider"
    )
    wait_http(f"http://127.0.0.1:{broker_port}/readyz", broker, "broker")
    wait_http(f"http://127.0.0.1:{hello_port}/", hello, "hello-world")
    floor = None
    if args.floor:
        floor = procs.start(
            [sys.executable, str(HERE / "hello.py"), "--port", str(floor_port), "--shaped"],
            stdout=subprocess.DEVNULL,
            env=env,
        )
        wait_http(f"http://127.0.0.1:{floor_port}/healthz", floor, "floor")

    check_token(broker_port, api_key)
    wrk_env = {
        **os.environ,
        "BENCH_PATH": f"/v1/tokens/{PROVIDER}/{USER}",
        "BENCH_USERS": str(args.grants),
        "BENCH_API_KEY": api_key,
    }
    token_target = "broker GET token" + (f" ({args.workers} workers)" if args.workers > 1 else "")
    targets = {
        "hello-world": (f"http://127.0.0.1:{hello_port}", hello.pid),
        token_target: (f"http://127.0.0.1:{broker_port}", broker.pid),
    }
    if floor is not None:
        targets[FLOOR] = (f"http://127.0.0.1:{floor_port}", floor.pid)
    rows = [
        ["round", "target", "req/s", "p50 ms", "p99 ms", "errors", "CPU s/s", "CPU µs/req", "ratio"]
    ]
    ratios, floor_ratios = [], []

    def measured(name: str) -> Load:
        """A run after ``--warm-up`` seconds of the same load: caches as a serving process has
        them (broker's grant cache empties while the other target is measured)."""
        if args.warm_up > 0:
            wrk(name, *targets[name], wrk_env, args.warm_up, args.connections)
        return wrk(name, *targets[name], wrk_env, args.seconds, args.connections)

    for n in range(1, args.rounds + 1):
        base = measured("hello-world")
        loads = [base, *([measured(FLOOR)] if floor is not None else []), measured(token_target)]
        ratios.append(loads[-1].rps / base.rps)
        if floor is not None:
            floor_ratios.append(loads[1].rps / base.rps)
        for load in loads:
            rows.append(
                [
                    str(n),
                    load.target,
                    f"{load.rps:,.0f}",
                    f"{load.p50_ms:.2f}",
                    f"{load.p99_ms:.2f}",
                    str(load.errors),
                    f"{load.cpu:.2f}",
                    f"{load.cpu / load.rps * 1e6:.0f}",
                    f"{load.rps / base.rps:.2f}",
                ]
            )
    print()
    print(table(rows))

    hits = cache_hit_share(broker_port)
    cpu = cpu_seconds(broker.pid)
    time.sleep(args.idle_seconds)
    idle = (cpu_seconds(broker.pid) - cpu) / args.idle_seconds
    per_hash, per_grant = redis_bytes_per_grant(redis_port, args.grants, used_before)
    log_lines = sum(1 for _ in log_path.open("rb"))
    print()
    summary = [
        ["figure", "value"],
        ["ratio to hello-world (per round)", ", ".join(f"{r:.2f}" for r in ratios)],
        ["ratio, median", f"{statistics.median(ratios):.2f}"],
        *(
            [["floor's ratio to hello-world, median", f"{statistics.median(floor_ratios):.2f}"]]
            if floor_ratios
            else []
        ),
        ["broker idle CPU", f"{idle * 1000:.1f} ms/s ({args.grants:,} grants, scheduler on)"],
        [
            "grant cache hits",
            f"{hits:.0%} of token requests (token_cache_seconds = {args.token_cache_seconds:g})",
        ],
        ["broker RSS", f"{rss_mib(broker.pid):.0f} MiB"],
        [
            "Redis bytes per grant (MEMORY USAGE)",
            f"{per_hash:.0f} (record_format = {args.record_format})",
        ],
        ["Redis used_memory growth per grant", f"{per_grant:.0f}"],
        ["broker log lines written", f"{log_lines:,}"],
    ]
    if args.refreshes:
        from refresher import throughput  # bench/, beside this file

        configure_logging("console", "warning")

        rate, cpu_per = asyncio.run(
            throughput(f"redis://127.0.0.1:{redis_port}/1", args.refreshes, 32)
        )
        summary.append(["refreshes/s (one process)", f"{rate:,.0f}"])
        summary.append(["CPU per refresh", f"{cpu_per * 1000:.2f} ms"])
    print(table(summary))
    if args.keep_logs:
        print(f"\nbroker log: {log_path}")


if __name__ == "__main__":
    main()
