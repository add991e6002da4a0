"""``broker serve --workers N``: N worker processes on one port, and the supervisor of them.

One Python process serves about one core. Each worker is a whole broker, as a replica is: its own
Redis pool and scheduler (schedulers already share work safely through Redis). They bind the
same port with ``SO_REUSEPORT``, so the kernel spreads connections over them. ``/metrics`` is
aggregated across them with prometheus-client's multiprocess mode: the supervisor gives every
worker one ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory of its own unless the variable is set,
which it then wipes at start: stale files would be summed in).

The supervisor forwards SIGTERM and SIGINT to every worker and waits for them to drain (each
within ``shutdown_timeout``). When a worker dies on its own the supervisor stops the others and
exits 1, so the orchestrator restarts the whole pod rather than a half-sized one lingering.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from broker.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_FLAG = "--worker"  # hidden: the supervisor's children bind with SO_REUSEPORT
KILL_MARGIN = 5.0  # seconds past shutdown_timeout before a worker that did not stop is killed


def check(settings: Settings, workers: int) -> str | None:
    """Why these settings cannot run ``workers`` processes, or None."""
    if workers > 1 and settings.is_memory_store:
        return "--workers needs a shared store (redis_url): memory:// is per process"
    if workers > 1 and settings.port == 0:
        return "--workers needs a fixed port (port = 0 would give each worker its own)"
    return None


def supervise(config: str | None, workers: int, settings: Settings) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT or one of them dies."""
    from prometheus_client import multiprocess

    env = dict(os.environ)
    own_dir: str | None = None
    if env.get(MULTIPROC_ENV):
        for stale in Path(env[MULTIPROC_ENV]).glob("*.db"):
            stale.unlink()
    else:
        own_dir = env[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="broker-metrics-")
    wake = threading.Event()
    stop_requested: list[int] = []

    def on_signal(signum: int, _: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            stop_requested.append(signum)
        wake.set()

    # Handlers first: a worker that dies at once still wakes us (exec resets them in workers).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, on_signal)
    command = [sys.executable, "-m", "broker", "serve", WORKER_FLAG]
    if config is not None:
        command += ["--config", config]
    # Own sessions: a terminal's Ctrl-C reaches the supervisor only, which stops the workers
    # once, with SIGTERM.
    children = [
        subprocess.Popen(command, env=env, start_new_session=True)  # noqa: S603
        for _ in range(workers)
    ]
    try:
        while not stop_requested and all(child.poll() is None for child in children):
            wake.wait()
            wake.clear()
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=settings.shutdown_timeout + KILL_MARGIN)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            multiprocess.mark_process_dead(child.pid, env[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    clean = bool(stop_requested) and all(child.returncode == 0 for child in children)
    return 0 if clean else 1
