"""``broker demo`` as a newcomer runs it: a real process, its output, its exit status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import SECRETS

DEMO = (sys.executable, "-m", "broker", "demo")
DEMO_TIMEOUT = 45


def demo_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}


def remember_secrets(output: str) -> None:
    SECRETS.update(re.findall(r"brk_[A-Za-z0-9_-]{20,}", output))
    SECRETS.update(re.findall(r"state=([A-Za-z0-9_-]{20,})", output))


def test_the_demo_connects_a_user_and_refreshes_in_the_background() -> None:
    finished = subprocess.run(
        [*DEMO, "--token-ttl", "5", "--refreshes", "2", "--duration", "40"],
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    out = finished.stdout
    remember_secrets(out)
    assert finished.returncode == 0, (out, finished.stderr)
    assert "POST /v1/authorizations/demo -> 201" in out
    assert re.search(r"GET http://127\.0\.0\.1:\d+/oauth/demo/callback\?code=\.\.\.", out)
    assert "Your app got status=connected" in out
    assert "refreshed in the background (refresh #1)" in out
    assert "refreshed in the background (refresh #2)" in out
    assert "2 background refresh(es)" in out
    assert "token fetch OK" in out
    assert "FAILED" not in out
    assert "Traceback" not in out + finished.stderr


def test_the_demo_stops_cleanly_on_sigterm() -> None:
    process = subprocess.Popen(
        [*DEMO, "--token-ttl", "30"],
        env=demo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + DEMO_TIMEOUT
    try:
        for line in process.stdout:  # until the first live status line
            seen.append(line)
            if "token fetch OK" in line or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = "".join(seen) + rest
    remember_secrets(out)
    assert process.returncode == 0, (out, errors)
    assert "Your app got status=connected" in out
    assert "Stopped." in out
    assert "Traceback" not in out + errors


def test_the_demo_refuses_token_lifetimes_under_five_seconds() -> None:
    finished = subprocess.run(
        [*DEMO, "--token-ttl", "2"],
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    assert finished.returncode == 2
    assert "--token-ttl: must be at least 5" in finished.stderr
