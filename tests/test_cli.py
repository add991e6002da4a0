"""The ``broker`` command, run as a real process the way operators run it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker.config import parse_encryption_keys

VALID = """
host = "127.0.0.1"
port = {port}

[providers.alfresco]
token_url = "https://idp.example/token"
client_id = "broker"

[[clients]]
name = "billing"
key_sha256 = "{digest}"
providers = ["alfresco"]
permissions = ["tokens:read"]
"""


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}


def broker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(tmp_path: Path, port: int = 8080, extra_provider_line: str = "") -> Path:
    text = VALID.format(port=port, digest="ab" * 32)
    text = text.replace('client_id = "broker"', f'client_id = "broker"\n{extra_provider_line}')
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_keygen_prints_a_usable_encryption_key() -> None:
    result = broker("keygen")
    assert result.returncode == 0
    [(_, material)] = parse_encryption_keys(result.stdout.strip())
    assert len(material) == 32


def test_apikey_prints_a_key_and_its_sha256() -> None:
    result = broker("apikey")
    assert result.returncode == 0
    key = re.search(r"api key .*: (\S+)$", result.stdout, re.MULTILINE)
    digest = re.search(r'key_sha256 .*"([0-9a-f]{64})"$', result.stdout, re.MULTILINE)
    assert key is not None
    assert digest is not None
    assert digest.group(1) == hashlib.sha256(key.group(1).encode()).hexdigest()


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    result = broker("check-config", "--config", str(write_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration ok")
    assert "alfresco" in result.stdout


def test_check_config_names_the_bad_setting_and_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra_provider_line="bogus = 1")
    result = broker("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "providers.alfresco.bogus: unknown setting" in result.stderr
    assert result.stdout == ""


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - a loopback URL
        return json.load(response)


def test_serve_answers_healthz_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    with (tmp_path / "stderr.log").open("w+", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            health = None
            for _ in range(100):
                try:
                    health = get_json(f"http://127.0.0.1:{port}/healthz")
                    break
                except OSError:
                    if process.poll() is not None:
                        break
                    time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        log.seek(0)
        output = log.read()
    assert health == {"status": "ok"}, output
    assert returncode == 0, output


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_a_missing_config_file_is_reported(tmp_path: Path, command: str) -> None:
    result = broker(command, "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "config: file not found" in result.stderr
