"""A refresh interrupted mid-flight must not cost the user their grant, with default settings.

Two real ``broker serve`` processes, A and B, share one redis-server. A starts a refresh; the
provider (which, like a strict one, revokes the whole grant when a rotated-out refresh token is
presented again: RFC 9700 4.14.2) rotates the token and answers; and then A cannot act for
eight seconds: frozen (SIGSTOP: a GC pause, a stalled VM, a throttled container), or cut off
from Redis (a partition). Meanwhile B is asked for the same token. B may answer with a live
token or ``503 upstream_unavailable``; it must never spend the old refresh token, because one
reuse revokes the grant and the user must log in again. Afterwards the grant is active and can
be refreshed again. No lock, lease or timeout setting is tuned here: the defaults must be safe.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from broker.devprovider import DevProvider
from tests.conftest import RedisServer, path
from tests.faults import TcpProxy
from tests.fleet import Fleet, Replica, TomlScalar, start_fleet, stop_fleet

USER = "u-1"
# on-demand refreshes only; info logs tell, on failure, what each replica did
SETTINGS: dict[str, TomlScalar] = {"scheduler_enabled": False, "log_level": "info"}
FAULT_SECONDS = 8.0  # how long A cannot act: a duration by design
ASK_EVERY = 1.0  # seconds between two questions to B during the fault
IMPORTED_TTL = 1  # the imported access token: expired before the refresh starts
FAULT_TTL = 15  # lifetime of the token A's refresh gets: under half left after the fault
LATER_TTL = 3600
ANSWER_TIMEOUT = 25.0  # seconds any one request to a replica may take
POLL = 0.01


@dataclass
class Answer:
    status: int
    body: Any

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None

    @property
    def token(self) -> str | None:
        return self.body.get("access_token") if isinstance(self.body, dict) else None


@dataclass
class Findings:
    """Every property a test checks, failed ones listed together: one run tells all."""

    failed: list[str] = field(default_factory=list)

    def expect(self, holds: bool, what: str) -> None:
        if not holds:
            self.failed.append(what)


def live(provider: DevProvider, token: str | None) -> bool:
    """Whether the provider issued ``token`` and it is neither revoked nor expired."""
    expires = None if token is None else provider.access_token_expires_at(token)
    return expires is not None and expires > time.time()


async def until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL)


async def call(
    http: aiohttp.ClientSession, fleet: Fleet, replica: Replica, method: str, target: str, **kw: Any
) -> Answer:
    url = URL(replica.url + target, encoded=True)  # the path is percent-encoded already
    async with http.request(method, url, headers=fleet.headers, **kw) as response:
        return Answer(response.status, await response.json(content_type=None))


async def token(
    http: aiohttp.ClientSession, fleet: Fleet, replica: Replica, min_ttl: int = 0
) -> Answer:
    return await call(http, fleet, replica, "GET", path("tokens", USER) + f"?min_ttl={min_ttl}")


def problem(answer: Answer, provider: DevProvider) -> str:
    """What is wrong with an answer of B, judged the moment it came: "" when nothing."""
    if answer.status == 200:
        return "" if live(provider, answer.token) else "200 with a token the provider rejects"
    if answer.status == 503 and answer.code == "upstream_unavailable":
        return ""
    return f"{answer.status} {answer.code}"


@dataclass
class Incident:
    first: Answer  # A's answer to the request whose refresh the fault interrupted
    seen_by_b: list[str]  # B's answers during the fault, in order: "200", "503 ...", ...
    bad_from_b: list[str]


async def refresh_interrupted(
    http: aiohttp.ClientSession,
    fleet: Fleet,
    provider: DevProvider,
    cut: Callable[[], None],
    restore: Callable[[], None],
) -> Incident:
    """Import an expired grant; A refreshes it and ``cut()`` strikes once the provider has the
    request; the provider answers; B is asked every second; after the fault, ``restore()``."""
    a, b = fleet.replicas
    imported = {
        "refresh_token": provider.issue_refresh_token(USER),
        "access_token": "at-imported",
        "expires_in": IMPORTED_TTL,
    }
    put = await call(http, fleet, a, "PUT", path("grants", USER), json=imported)
    assert put.status == 201, put.body
    await asyncio.sleep(IMPORTED_TTL + 0.1)  # until it has expired: B cannot serve it
    provider.settings.access_token_ttl = FAULT_TTL
    provider.hold()
    arrived = provider.token_requests + 1
    first = asyncio.create_task(token(http, fleet, a))
    await provider.wait_for_token_requests(arrived)
    cut()
    provider.release()
    await until(lambda: len(provider.access_token_times(USER)) == 1, "the provider's answer")

    async def ask_b() -> tuple[str, str]:
        answer = await token(http, fleet, b)
        return f"{answer.status} {answer.code or ''}".strip(), problem(answer, provider)

    asked: list[asyncio.Task[tuple[str, str]]] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + FAULT_SECONDS
    while (now := loop.time()) < end:
        asked.append(asyncio.create_task(ask_b()))
        await asyncio.sleep(min(ASK_EVERY, end - now))
    restore()
    answer = await first
    answers = await asyncio.gather(*asked)
    return Incident(answer, [seen for seen, _ in answers], [bad for _, bad in answers if bad])


async def check_grant_survived(
    http: aiohttp.ClientSession,
    fleet: Fleet,
    provider: DevProvider,
    incident: Incident,
    findings: Findings,
) -> None:
    """No reuse, the grant is active, and it refreshes again to a token the provider honours."""
    b = fleet.replicas[1]
    findings.expect(
        provider.reused_refresh_tokens == 0,
        f"the provider saw {provider.reused_refresh_tokens} reused refresh token(s)",
    )
    status = await call(http, fleet, b, "GET", path("grants", USER))
    findings.expect(
        status.status == 200 and status.body.get("state") == "active",
        f"grant status after the fault: {status.status} {status.body.get('state')!r} "
        f"({status.body.get('last_error') or status.body.get('code')})",
    )
    # A's token has under half its lifetime left, so min_ttl forces a refresh.
    provider.settings.access_token_ttl = LATER_TTL
    refreshes, reused = provider.refresh_requests, provider.reused_refresh_tokens
    again = await token(http, fleet, b, min_ttl=LATER_TTL)
    findings.expect(
        again.status == 200 and provider.refresh_requests == refreshes + 1,
        f"refreshing again: {again.status} {again.code} "
        f"after {provider.refresh_requests - refreshes} provider call(s)",
    )
    findings.expect(
        again.status != 200
        or (again.token != incident.first.token and live(provider, again.token)),
        "refreshing again returned a token the provider does not honour",
    )
    findings.expect(provider.reused_refresh_tokens == reused, "refreshing again reused a token")


def report(fleet: Fleet, incident: Incident | None, findings: Findings) -> str:
    a, b = fleet.replicas
    lines = [*findings.failed]
    if incident is not None:
        lines.append(f"A answered {incident.first.status} {incident.first.code or ''}")
        lines.append(f"B answered, in order: {incident.seen_by_b}")
    lines.append(f"A logged: {[e for e in a.events() if '.' in e]}")
    lines.append(f"B logged: {[e for e in b.events() if '.' in e]}")
    return "\n".join(lines)


async def test_a_replica_frozen_mid_refresh_does_not_cost_the_grant(
    provider: DevProvider, own_redis: RedisServer, tmp_path: Path
) -> None:
    fleet = await start_fleet(provider, [own_redis.url] * 2, tmp_path, SETTINGS)
    a = fleet.replicas[0]
    findings, incident = Findings(), None
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT)
        ) as http:
            incident = await refresh_interrupted(
                http,
                fleet,
                provider,
                cut=lambda: a.process.send_signal(signal.SIGSTOP),
                restore=lambda: a.process.send_signal(signal.SIGCONT),
            )
            findings.expect(incident.bad_from_b == [], f"during the freeze: {incident.bad_from_b}")
            first = incident.first
            findings.expect(first.status == 200, f"A answered {first.status} {first.code}")
            findings.expect(
                first.status != 200 or live(provider, first.token),
                "A handed out a token the provider does not honour",
            )
            await check_grant_survived(http, fleet, provider, incident, findings)
    finally:
        provider.release()
        await stop_fleet(fleet)
    for replica in fleet.replicas:
        findings.expect(
            replica.process.returncode == 0, f"exit status {replica.process.returncode}"
        )
        findings.expect(
            "Traceback" not in replica.log.read_text(), f"{replica.log.name}: Traceback"
        )
    assert findings.failed == [], report(fleet, incident, findings)


async def test_a_replica_cut_off_from_redis_mid_refresh_does_not_cost_the_grant(
    provider: DevProvider, own_redis: RedisServer, tmp_path: Path
) -> None:
    findings, incident = Findings(), None
    async with await TcpProxy.start("127.0.0.1", own_redis.port) as proxy:
        urls = [proxy.url_for_redis(), own_redis.url]  # A through the proxy, B directly
        fleet = await start_fleet(provider, urls, tmp_path, SETTINGS)
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT)
            ) as http:
                incident = await refresh_interrupted(
                    http, fleet, provider, cut=proxy.blackhole, restore=proxy.heal
                )
                findings.expect(
                    incident.bad_from_b == [], f"during the partition: {incident.bad_from_b}"
                )
                first = incident.first
                findings.expect(
                    first.status in (200, 503), f"A answered {first.status} {first.code}"
                )
                findings.expect(
                    first.status != 200 or live(provider, first.token),
                    "A handed out a token the provider does not honour",
                )
                await check_grant_survived(http, fleet, provider, incident, findings)
        finally:
            provider.release()
            proxy.heal()  # a replica cut off from Redis cannot drain
            await stop_fleet(fleet)
    for replica in fleet.replicas:
        findings.expect(
            replica.process.returncode == 0, f"exit status {replica.process.returncode}"
        )
        findings.expect(
            "Traceback" not in replica.log.read_text(), f"{replica.log.name}: Traceback"
        )
    assert findings.failed == [], report(fleet, incident, findings)
