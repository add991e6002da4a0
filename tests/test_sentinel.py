"""A Sentinel-managed Redis: a failover loses no grant whose write the replica acknowledged.

One primary, one replica and one sentinel on loopback, all Debian's redis-server. Imports
validate (and so rotate) refresh tokens at the provider, and with ``min_replicas_to_ack = 1``
each write waits until the replica holds it. Then the primary is killed with SIGKILL.

``WAIT`` waits for the replication offset as of its own connection's previous command, so it
must follow the write on that connection: ``redis-cli monitor`` on the primary records which
connection sent what while the replica is frozen (SIGSTOP). And a failover while rotated tokens
are on their way to Redis (the provider has answered, the primary is gone) must lose none.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as syncredis

from broker.api import METRICS, REFRESHER, STORE
from broker.devprovider import DevProvider
from tests.conftest import (
    Broker,
    BrokerFactory,
    RedisServer,
    eventually,
    free_port,
    throwaway_redis,
)

USERS = 20
CONCURRENT_IMPORTS = 10


@dataclass
class SentinelSetup:
    primary: RedisServer
    replica: RedisServer
    url: str


def wait_until(check: object, what: str) -> None:
    for _ in range(200):
        try:
            if check():  # type: ignore[operator]
                return
        except syncredis.RedisError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@dataclass(frozen=True)
class Command:
    """One command as MONITOR saw it: who sent it (``ip:port``), its name, its arguments."""

    client: str
    name: str
    args: tuple[str, ...]


# <unix time> [<db> <client address, or "lua" inside a script>] "NAME" "arg" ...; MONITOR
# escapes quotes, backslashes and non-printable bytes, so each command is one line.
MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ (?P<client>[^\]]+)\] "(?P<name>[^"]*)"(?P<args>.*)$')
MONITOR_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_monitor(lines: list[str]) -> list[Command]:
    """The commands clients sent, in the order the server ran them (script internals left out;
    lines that are no command, such as the ``OK`` that starts the stream, are skipped)."""
    commands = []
    for line in lines:
        match = MONITOR_LINE.match(line)
        if match is None or match["client"] == "lua":
            continue
        args = tuple(MONITOR_ARG.findall(match["args"]))
        commands.append(Command(match["client"], match["name"].upper(), args))
    return commands


class Monitor:
    """``redis-cli monitor`` on one server, every command it runs written to a file."""

    def __init__(self, port: int, output: Path) -> None:
        binary = shutil.which("redis-cli")
        if binary is None:
            pytest.skip("no redis-cli on this machine: install redis-tools")
        self.port = port
        self.output = output
        with output.open("wb") as stream:  # the child holds its own copy of the descriptor
            self.process = subprocess.Popen(
                [binary, "-p", str(port), "monitor"], stdout=stream, stderr=subprocess.DEVNULL
            )
        try:
            self._lines_before(lambda line: line.strip() == "OK", "redis-cli monitor to start")
        except BaseException:
            self.stop()
            raise

    def commands(self) -> list[Command]:
        """Every command the server ran so far: a marker is sent last, and the log is read
        up to the marker once it appears (so nothing before it is still unwritten)."""
        marker = f"monitor-marker-{uuid.uuid4().hex}"
        with syncredis.Redis(port=self.port) as client:
            client.echo(marker)
        return parse_monitor(self._lines_before(lambda line: marker in line, "the marker"))

    def _lines_before(self, found: Callable[[str], bool], what: str) -> list[str]:
        for _ in range(400):
            lines = self.output.read_text(encoding="utf-8", errors="replace").splitlines()
            for index, line in enumerate(lines):
                if found(line):
                    return lines[:index]
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-cli monitor exited ({self.process.returncode})")
            time.sleep(0.025)
        raise RuntimeError(f"timed out waiting for {what} in the MONITOR output")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def counter(broker: Broker, name: str, **labels: str) -> float:
    """A counter's value in the broker's registry (0 when never incremented)."""
    value = broker.app[METRICS].registry.get_sample_value(name, labels or None)
    return value or 0.0


def calls_each_followed_by_wait(commands: list[Command], sha: str) -> tuple[int, set[str]]:
    """(how many EVALSHA calls of script ``sha`` were seen, from which clients); fails on one
    whose connection's next command is not ``WAIT``."""
    by_client: dict[str, list[Command]] = {}
    for command in commands:
        by_client.setdefault(command.client, []).append(command)
    calls, clients = 0, set()
    for client, sent in by_client.items():
        for index, command in enumerate(sent):
            if command.name != "EVALSHA" or command.args[:1] != (sha,):
                continue
            calls += 1
            clients.add(client)
            following = sent[index + 1].name if index + 1 < len(sent) else "nothing"
            assert following == "WAIT", f"EVALSHA {sha[:8]} from {client}, then {following}"
    return calls, clients


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on this machine: install redis-server")
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    servers: list[RedisServer] = []
    sentinel: subprocess.Popen[bytes] | None = None
    try:
        primary = throwaway_redis(tmp_path / "primary")
        servers.append(primary)
        replica = throwaway_redis(
            tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port)
        )
        servers.append(replica)
        replica_client = syncredis.Redis(port=replica.port)
        wait_until(
            lambda: replica_client.info("replication")["master_link_status"] == "up",
            "the replica to sync",
        )
        sentinel_port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor mymaster 127.0.0.1 {primary.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 3000\n"
        )
        sentinel = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        sentinel_client = syncredis.Redis(port=sentinel_port)
        wait_until(
            lambda: sentinel_client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "replicas", "mymaster"
            ),
            "the sentinel to see the replica",
        )
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0"
        yield SentinelSetup(primary, replica, url)
    finally:
        if sentinel is not None:
            sentinel.kill()
            sentinel.wait(timeout=10)
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                server.stop()


async def test_failover_loses_no_acknowledged_grant(
    sentinel_setup: SentinelSetup, make_broker: BrokerFactory, provider: DevProvider
) -> None:
    broker = await make_broker(
        redis_url=sentinel_setup.url,
        min_replicas_to_ack=1,
        replica_ack_timeout=0.3,
        redis_timeout=0.5,
    )
    for i in range(USERS):
        status, _ = await broker.import_grant(
            f"u-{i}", refresh_token=provider.issue_refresh_token(f"u-{i}")
        )
        assert status == 201
    registry = broker.app[METRICS].registry
    assert (registry.get_sample_value("broker_replication_unconfirmed_total") or 0) == 0

    sentinel_setup.primary.stop()  # SIGKILL: the sentinel promotes the replica

    async def all_readable() -> bool:
        statuses = [(await broker.grant(f"u-{i}"))[0] for i in range(USERS)]
        return all(status == 200 for status in statuses)

    await eventually(all_readable, "every grant to be readable on the new primary", within=20)
    broker.clock.advance(3600)
    for i in range(USERS):  # the rotated refresh tokens survived: refreshing works
        status, _ = await broker.token(f"u-{i}")
        assert status == 200
    assert provider.reused_refresh_tokens == 0


@pytest.mark.parametrize("via", ["primary", "sentinel"])
async def test_wait_runs_on_the_connection_that_made_the_write(
    sentinel_setup: SentinelSetup,  # first: torn down after the broker has closed
    make_broker: BrokerFactory,
    provider: DevProvider,
    tmp_path: Path,
    via: str,
) -> None:
    """With the replica frozen no write can be acknowledged: each import's grant write must be
    counted as unconfirmed, and MONITOR must show its WAIT as the next command of the very
    connection that ran the fenced write. The counter alone cannot tell which connection ran
    WAIT: Redis waits for the replication offset as of the connection's previous command,
    whatever it was, so a WAIT elsewhere fails only when that connection was last used before
    the write (it then confirms a write it never covered); MONITOR shows it every time."""
    url = sentinel_setup.primary.url if via == "primary" else sentinel_setup.url
    broker = await make_broker(
        redis_url=url, min_replicas_to_ack=1, replica_ack_timeout=0.3, redis_timeout=1.0
    )
    fenced_write = broker.app[STORE]._fenced_write.sha
    lock_acquire = broker.app[REFRESHER].locks._store._acquire.sha
    unconfirmed_before = counter(broker, "broker_replication_unconfirmed_total")
    replica = sentinel_setup.replica.process
    assert replica is not None
    monitor = Monitor(sentinel_setup.primary.port, tmp_path / "monitor.log")
    paused = False
    try:
        replica.send_signal(signal.SIGSTOP)  # no failover: the sentinel watches the primary
        paused = True
        imports = [
            broker.import_grant(
                f"u-{i}",
                refresh_token=provider.issue_refresh_token(f"u-{i}"),
                access_token=f"at-imported-{i}",
                expires_in=3600,
            )
            for i in range(CONCURRENT_IMPORTS)
        ]
        answers = await asyncio.gather(*imports)
        replica.send_signal(signal.SIGCONT)
        paused = False
        commands = monitor.commands()
    finally:
        if paused:
            replica.send_signal(signal.SIGCONT)
        monitor.stop()

    assert [status for status, _ in answers] == [201] * CONCURRENT_IMPORTS, answers
    # one lock and one grant write per import, each reported unconfirmed
    unconfirmed = counter(broker, "broker_replication_unconfirmed_total") - unconfirmed_before
    assert unconfirmed == 2 * CONCURRENT_IMPORTS

    writes, writers = calls_each_followed_by_wait(commands, fenced_write)
    assert writes == CONCURRENT_IMPORTS
    assert len(writers) >= 2, f"all fenced writes came from {writers}: no concurrency to test"
    locks, _ = calls_each_followed_by_wait(commands, lock_acquire)
    assert locks == CONCURRENT_IMPORTS
    waits = [c.args for c in commands if c.name == "WAIT"]
    assert waits == [("1", "300")] * (writes + locks)


async def test_failover_while_rotations_are_written_loses_none(
    sentinel_setup: SentinelSetup,  # first: torn down after the broker has closed
    make_broker: BrokerFactory,
    provider: DevProvider,
) -> None:
    """Refreshes are at the provider when the primary dies; the provider answers (rotating
    every refresh token) while there is no primary. The broker must hand out the new access
    tokens, keep the new refresh tokens and store them once the sentinel has promoted the
    replica: a lost one would be presented again later, and the provider would revoke the
    grant (409 here)."""
    broker = await make_broker(
        redis_url=sentinel_setup.url,
        min_replicas_to_ack=1,
        replica_ack_timeout=0.3,
        redis_timeout=0.5,
    )
    users = [f"u-{i}" for i in range(USERS)]
    for user in users:
        status, _ = await broker.import_grant(
            user,
            refresh_token=provider.issue_refresh_token(user),
            access_token=f"at-imported-{user}",
            expires_in=60,
        )
        assert status == 201
    assert counter(broker, "broker_replication_unconfirmed_total") == 0  # all on the replica

    broker.clock.advance(3600)  # every imported access token has expired: GET refreshes
    arrived = provider.token_requests
    provider.hold()
    calls = [asyncio.create_task(broker.token(user)) for user in users]
    try:
        await provider.wait_for_token_requests(arrived + USERS, timeout=10)
        sentinel_setup.primary.stop()  # SIGKILL, with every refresh in flight at the provider
        provider.release()  # the provider rotates while there is no primary
        async with asyncio.timeout(20):
            answers = await asyncio.gather(*calls)
    finally:
        provider.release()
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    assert [status for status, _ in answers] == [200] * USERS, answers
    for _, body in answers:
        assert provider.access_token_expires_at(body["access_token"]) is not None

    async def rotations_stored() -> bool:
        assert counter(broker, "broker_rotated_writes_lost_total", provider="dev") == 0
        for user in users:  # stops at the first one not there yet: no primary, slow answers
            status, body = await broker.grant(user)
            if status != 200 or body["refresh_count"] != 1:
                return False
        return True

    await eventually(rotations_stored, "every rotated token to be stored", within=30)
    # A refresh ends after its write (and WAIT: 0.3 s with no replica left), the index update
    # and the lock release; until then a caller of that grant shares its result, which the
    # clock moved below would show as expired.
    refresher = broker.app[REFRESHER]

    async def refreshes_done() -> bool:
        return not refresher._inflight and not refresher.issued._pending

    await eventually(refreshes_done, "the refreshes to finish", within=10)
    assert counter(broker, "broker_rotated_writes_lost_total", provider="dev") == 0
    assert counter(broker, "broker_refresh_write_conflicts_total", provider="dev") == 0

    broker.clock.advance(3600)  # refresh again: with the refresh tokens the broker stored
    async with asyncio.timeout(20):
        again = await asyncio.gather(*(broker.token(user) for user in users))
    assert [status for status, _ in again] == [200] * USERS, again
    for (_, before), (_, after) in zip(answers, again, strict=True):
        assert after["access_token"] != before["access_token"]
        assert provider.access_token_expires_at(after["access_token"]) is not None
    assert provider.reused_refresh_tokens == 0
