"""Every audit event docs/audit.md documents is emitted, by the action it names, with the request
id of that request and only documented fields; none holds a secret (tests/test_redaction.py and
the session's log check guard that too)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from broker import audit
from broker.auth import Authenticator, hash_key
from broker.config import load_settings
from broker.devprovider import DevProvider
from broker.logs import OUTPUT, configure_logging
from broker.metrics import Metrics
from broker.reload import Reloader
from tests.clients import api_key, bearer, client
from tests.conftest import (
    PROVIDER,
    Broker,
    BrokerFactory,
    Landing,
    connect,
    free_port,
    logs_captured,
    path,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "audit.md"
SECTION = re.compile(r"^#{2,3} (.*)$", re.MULTILINE)
FIELD = re.compile(r"^\| `([a-z_]+)` \|", re.MULTILINE)


def documented() -> tuple[set[str], dict[str, set[str]]]:
    """(fields of every event, {event: its own fields}) as docs/audit.md lists them."""
    text = DOC.read_text(encoding="utf-8")
    parts = SECTION.split(text)
    common: set[str] = set()
    events: dict[str, set[str]] = {}
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        fields = set(FIELD.findall(body))
        if title == "Fields of every event":
            common = fields
        elif title.startswith("`"):
            events[title.strip("`")] = fields
    return common, events


def audit_records(log_file: Path) -> list[dict[str, Any]]:
    records = []
    for line in log_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("logger") == audit.LOGGER:
            records.append(record)
    return records


def find(log_file: Path, request_id: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(log_file) if r.get("request_id") == request_id]


async def call(broker: Broker, method: str, url: str, **kwargs: Any) -> tuple[int, str]:
    """(status, request id) of a request carrying a request id of its own."""
    request_id = "audit-" + uuid.uuid4().hex
    headers = {"X-Request-Id": request_id, **kwargs.pop("headers", {})}
    status, _, _ = await broker.call(method, url, headers=headers, **kwargs)
    return status, request_id


def lines_of(log_file: Path, request_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line.get("request_id") == request_id]


async def test_every_request_is_told_by_one_line(
    broker: Broker, provider: DevProvider, log_file: Path
) -> None:
    """An audited request's one line is its audit event, carrying the request's own fields;
    any other request (refused before its action, or not audited) gets a ``request`` line."""
    user = "one-line"
    body = {"refresh_token": provider.issue_refresh_token(user), "access_token": "at-1"}
    assert (await broker.import_grant(user, expires_in=3600, **body))[0] == 201
    wrong_key = {"Authorization": "Bearer not-a-key"}
    cases = [
        ("GET", path("tokens", user), {}, 200, "broker.audit", "token.handout", "info"),
        ("GET", path("tokens", "nobody"), {}, 404, "broker.audit", "token.handout", "warning"),
        ("DELETE", path("grants", user), {}, 204, "broker.audit", "grant.delete", "info"),
        ("GET", path("tokens", user), wrong_key, 401, "broker.http", "request", "info"),
        ("GET", "/healthz", {}, 200, "broker.http", "request", "info"),
    ]
    common, events = documented()
    for method, url, headers, status, logger, event, level in cases:
        answered, request_id = await call(broker, method, url, headers=headers)
        assert answered == status, (method, url)
        told = [line for line in lines_of(log_file, request_id) if "status" in line]
        assert len(told) == 1, told  # other events may name the request, none tells it again
        [line] = told
        assert (line["logger"], line["event"], line["level"]) == (logger, event, level)
        assert line["method"] == method
        assert line["status"] == status
        assert line["path"] == url.split("?")[0]
        assert line["duration_ms"] >= 0
        if logger == audit.LOGGER:
            assert set(line) <= common | events[event], line
            assert line["route"] in (
                "/v1/tokens/{provider}/{user_id}",
                "/v1/grants/{provider}/{user_id}",
            )


async def test_an_audit_event_of_another_task_is_written_at_once() -> None:
    """A task started during a request copies its context: an event it records must not wait
    for (or be told as) that request's line."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    output = vars(OUTPUT).copy()
    configure_logging("json", "info", stream=stream)
    try:
        line = audit.request_line()

        async def elsewhere() -> None:
            audit.record(
                audit.CONFIG_RELOAD, client=None, provider=None, user_id=None, outcome="applied"
            )

        await asyncio.create_task(elsewhere())
        assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["config.reload"]
        audit.record(audit.GRANT_DELETE, client="c", provider="p", user_id="u", outcome="success")
        audit.record(audit.GRANT_IMPORT, client="c", provider="p", user_id="u", outcome="success")
        assert line.write(method="DELETE", status=204)
        assert not line.write(method="DELETE", status=204)  # written once
        audit.record(audit.GRANT_IMPORT, client="c", provider="p", user_id="v", outcome="success")
    finally:
        structlog.configure(**config)
        vars(OUTPUT).update(output)
        root.handlers[:] = handlers
        root.setLevel(level)
    written = [json.loads(x) for x in stream.getvalue().splitlines()]
    # the second event of the request and the one after its line are written as they happen
    assert [(r["event"], r.get("status")) for r in written] == [
        ("config.reload", None),
        ("grant.import", None),
        ("grant.delete", 204),
        ("grant.import", None),
    ]


def test_the_documentation_lists_the_events_the_code_defines() -> None:
    common, events = documented()
    assert set(events) == set(audit.EVENTS)
    assert {"event", "client", "provider", "user_id", "request_id", "outcome"} <= common


async def test_each_request_event_is_emitted_with_its_request_id(
    make_broker: BrokerFactory,
    provider: DevProvider,
    landing: Landing,
    browser: aiohttp.ClientSession,
    log_file: Path,
    store_url: dict[str, str],
) -> None:
    limited = api_key()
    broker = await make_broker(
        port=free_port(), redirect_allowlist=[landing.url + "/"], **store_url
    )
    common, documented_events = documented()
    seen: dict[str, list[dict[str, Any]]] = {}

    def expect(request_id: str, event: str, **fields: Any) -> None:
        [record] = find(log_file, request_id)
        assert record["event"] == event
        for name, value in fields.items():
            assert record[name] == value, (name, record)
        assert set(record) <= common | documented_events[event], record
        seen.setdefault(event, []).append(record)

    user = "audit/ü ser"
    refresh_token = provider.issue_refresh_token(user)
    status, rid = await call(
        broker, "PUT", path("grants", user), json={"refresh_token": refresh_token}
    )
    assert status == 201
    expect(
        rid,
        "grant.import",
        client="svc",
        provider=PROVIDER,
        user_id=user,
        replaced=False,
        outcome="success",
    )
    status, rid = await call(
        broker,
        "PUT",
        path("grants", user),
        json={"refresh_token": provider.issue_refresh_token(user)},
    )
    assert status == 200
    expect(rid, "grant.import", replaced=True, outcome="success")

    status, rid = await call(broker, "GET", path("tokens", user))
    assert status == 200
    expect(rid, "token.handout", client="svc", user_id=user, source="get", outcome="success")
    assert seen["token.handout"][-1]["expires_at"]
    status, rid = await call(
        broker, "POST", path("tokens", user) + "/refresh", json={"rejected_token": "not-held"}
    )
    assert status == 200
    expect(rid, "token.handout", source="rejected_report", outcome="success")
    status, rid = await call(broker, "GET", path("tokens", "nobody"))
    assert status == 404
    expect(rid, "token.handout", user_id="nobody", outcome="grant_not_found")

    status, rid = await call(broker, "GET", f"/v1/app-tokens/{PROVIDER}?scope=b%20a")
    assert status == 404  # the dev provider here has no client_credentials
    expect(
        rid,
        "app_token.handout",
        client="svc",
        user_id=None,
        scope="a b",
        outcome="app_token_not_configured",
    )

    status, rid = await call(broker, "DELETE", path("grants", user))
    assert status == 204
    expect(rid, "grant.delete", user_id=user, outcome="success", revocation="revoked")

    status, rid = await call(
        broker,
        "POST",
        f"/v1/authorizations/{PROVIDER}",
        json={"user_id": "browser-user", "redirect_after": landing.url + "/done"},
    )
    assert status == 201
    expect(rid, "authorization.start", client="svc", user_id="browser-user", outcome="success")

    # the whole flow: the callback's event names the client that started it
    before = len(audit_records(log_file))
    journey = await connect(broker, browser, "flow-user", landing.url + "/done")
    assert journey.query["status"] == "connected"
    finished = [r for r in audit_records(log_file)[before:] if r["event"] == "authorization.finish"]
    [finish] = finished
    assert finish["client"] == "svc"
    assert finish["user_id"] == "flow-user"
    assert finish["outcome"] == "connected"
    assert finish["replaced"] is False
    assert finish["request_id"]
    assert set(finish) <= common | documented_events["authorization.finish"]
    # a reused state: nothing exchanged, still audited
    async with browser.get(journey.callback_url) as response:
        assert response.status == 400
        request_id = response.headers["X-Request-Id"]
    [again] = find(log_file, request_id)
    assert again["event"] == "authorization.finish"
    assert again["outcome"] == "invalid_state"
    assert again["client"] is None

    # a forbidden attempt is audited with the code the client got
    other = await make_broker(clients=[client("team", limited, user_ids=["team/*"])], **store_url)
    status, rid = await call(other, "GET", path("tokens", "elsewhere"), headers=bearer(limited))
    assert status == 403
    expect(rid, "token.handout", client="team", user_id="elsewhere", outcome="forbidden")
    assert seen["token.handout"][-1]["level"] == "warning"


def test_a_reload_is_audited_and_a_refused_one_names_the_setting(
    tmp_path: Path, log_file: Path
) -> None:
    first, second = api_key(), api_key()
    config = tmp_path / "broker.toml"

    def write(*clients: tuple[str, str]) -> None:
        config.write_text(
            "".join(
                f'[[clients]]\nname = "{name}"\nkey_sha256 = "{digest}"\n'
                'providers = ["*"]\npermissions = ["tokens:read"]\n'
                for name, digest in clients
            )
        )

    write(("a", hash_key(first)))
    running = load_settings(config, {})
    authenticator = Authenticator(running.clients)
    metrics = Metrics()
    reloader = Reloader(config, running, authenticator, metrics, environ={})
    before = len(audit_records(log_file))
    assert reloader.reload() == "unchanged"
    write(("a", hash_key(first)), ("b", hash_key(second)))
    assert reloader.reload() == "applied"
    assert [c.name for c in authenticator.clients] == ["a", "b"]
    write(("a", "0" * 63))
    assert reloader.reload() == "refused"
    assert [c.name for c in authenticator.clients] == ["a", "b"]
    common, events = documented()
    records = [r for r in audit_records(log_file)[before:] if r["event"] == "config.reload"]
    assert [r["outcome"] for r in records] == ["unchanged", "applied", "refused"]
    assert records[1]["clients_added"] == ["b"]
    assert records[2]["setting"] == "clients.a.key_sha256"
    assert "0" * 63 not in json.dumps(records[2])
    for record in records:
        assert set(record) <= common | events["config.reload"], record
    assert 'broker_config_reloads_total{outcome="refused"} 1.0' in metrics.render().decode()


def test_audit_events_are_written_whatever_the_log_level() -> None:
    with logs_captured("warning") as stream:
        structlog.get_logger("broker.http").info("request")  # below warning: dropped
        audit.record(audit.TOKEN_HANDOUT, client="c", provider="p", user_id="u", outcome="success")
    written = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["logger"], r["event"], r["level"]) for r in written] == [
        ("broker.audit", "token.handout", "info")
    ]
