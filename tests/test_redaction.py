"""Log redaction: secrets passed under a telling name never reach the output."""

from __future__ import annotations

import io
import logging
from typing import Any

import structlog

from broker.logs import REDACTED, redact
from tests.conftest import lines

SENSITIVE = {
    "refresh_token": "rt-secret",
    "access_token": "at-secret",
    "client_secret": "cs-secret",
    "Authorization": "Bearer brk_secret",
    "code": "auth-code-secret",
}


def redacted(event: dict[str, Any]) -> dict[str, Any]:
    return dict(redact(None, "info", event))


def test_sensitive_keys_are_replaced_at_the_top_level() -> None:
    out = redacted({"event": "token.issued", "user_id": "u-1", "status": 200, **SENSITIVE})
    assert {key: out[key] for key in SENSITIVE} == dict.fromkeys(SENSITIVE, REDACTED)
    assert (out["event"], out["user_id"], out["status"]) == ("token.issued", "u-1", 200)


def test_fields_named_like_secrets_are_replaced_too() -> None:
    telling = {
        "new_refresh_token": "rt-2",
        "X-Api-Key": "k",
        "Proxy-Authorization": "Basic x",
        "db_password": "pw",
        "pkce_code_verifier": "v",
        "upstream_client_secret": "cs",
    }
    harmless = {
        "token_type": "Bearer",
        "refresh_token_issued_at": "2026-11-25T00:00:00Z",
        "keys": 2,
        "expires_in": 60,
    }
    out = redacted({"event": "e", **telling, **harmless})
    assert {k: out[k] for k in telling} == dict.fromkeys(telling, REDACTED)
    assert {k: out[k] for k in harmless} == harmless


def test_sensitive_keys_are_replaced_in_nested_dicts_and_lists() -> None:
    out = redacted(
        {
            "event": "provider.response",
            "request": {"headers": {"Authorization": "Bearer x", "Accept": "json"}},
            "body": [{"code": "c-1", "state": "s-1"}, ("refresh_token", "kept as a value")],
            "grants": ({"access_token": "at-1", "scope": "public_api"},),
        }
    )
    assert out["request"] == {"headers": {"Authorization": REDACTED, "Accept": "json"}}
    assert out["body"] == [{"code": REDACTED, "state": "s-1"}, ["refresh_token", "kept as a value"]]
    assert out["grants"] == [{"access_token": REDACTED, "scope": "public_api"}]


def test_a_line_like_a_harmless_one_is_still_redacted() -> None:
    """Field names judged harmless are remembered: the same names with a container value, or
    with one secret name more, are still looked into."""
    harmless = {"event": "request", "status": 200, "detail": "x"}
    assert redacted(dict(harmless)) == harmless
    assert redacted(dict(harmless)) == harmless  # now from the remembered verdicts
    nested = redacted({**harmless, "detail": {"refresh_token": "rt-secret"}})
    assert nested["detail"] == {"refresh_token": REDACTED}
    in_list = redacted({**harmless, "detail": [{"code": "c-1"}]})
    assert in_list["detail"] == [{"code": REDACTED}]
    assert redacted({**harmless, "access_token": "at-secret"})["access_token"] == REDACTED


def test_structlog_events_are_written_as_redacted_json(log_stream: io.StringIO) -> None:
    log = structlog.get_logger("test.redaction")
    log.info("token.issued", user_id="u-1", access_token="at-secret", extra={"code": "c-1"})
    [line] = lines(log_stream)
    assert line["event"] == "token.issued"
    assert (line["level"], line["logger"], line["user_id"]) == ("info", "test.redaction", "u-1")
    assert line["access_token"] == REDACTED
    assert line["extra"] == {"code": REDACTED}
    assert "at-secret" not in log_stream.getvalue()
    assert "c-1" not in log_stream.getvalue()


def test_stdlib_records_go_through_the_same_redacting_chain(log_stream: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(request_id="req-1", authorization="Bearer brk_secret")
    logging.getLogger("test.stdlib").warning("upstream slow: %s ms", 250)
    [line] = lines(log_stream)
    assert line["event"] == "upstream slow: 250 ms"
    assert (line["level"], line["logger"], line["request_id"]) == (
        "warning",
        "test.stdlib",
        "req-1",
    )
    assert line["authorization"] == REDACTED
    assert "brk_secret" not in log_stream.getvalue()
