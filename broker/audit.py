"""The audit log: one structured event per security-relevant action, for a SIEM.

Every event goes to the logger ``broker.audit`` (never filtered by ``log_level``, see
``broker.logs``) with the fields ``event``, ``client``, ``provider``, ``user_id``, ``outcome``
(``success``, or the problem ``code`` the client got) and ``request_id`` (bound per request by
``broker.logs.bind_request``), plus action-specific fields. docs/audit.md lists every event and
field; add an event there when you add one here. Never pass a token, key or secret.

An HTTP request gets one line: its audit event, written when the request ends and carrying the
request's own fields (:class:`RequestLine`), or else the ``request`` line. Two full lines per
token request were a quarter of its CPU (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import structlog

from broker.errors import BrokerError

LOGGER = "broker.audit"
SUCCESS = "success"

# The events, as docs/audit.md documents them (tests check that each is emitted).
TOKEN_HANDOUT = "token.handout"
GRANT_IMPORT = "grant.import"
GRANT_DELETE = "grant.delete"
AUTHORIZATION_START = "authorization.start"
AUTHORIZATION_FINISH = "authorization.finish"
CONFIG_RELOAD = "config.reload"
APP_TOKEN_HANDOUT = "app_token.handout"
REKEY_FINISH = "rekey.finish"
EVENTS = (
    TOKEN_HANDOUT,
    GRANT_IMPORT,
    GRANT_DELETE,
    AUTHORIZATION_START,
    AUTHORIZATION_FINISH,
    CONFIG_RELOAD,
    APP_TOKEN_HANDOUT,
    REKEY_FINISH,
)
# Outcomes of events with outcomes of their own that are no failure (written at info).
FINE = frozenset({SUCCESS, "applied", "unchanged", "complete", "dry_run", "incomplete"})

# Filtered at info whatever ``log_level`` says: the configured wrapper class would drop these
# events under ``log_level = "warning"``.
_log = structlog.wrap_logger(
    None,
    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    logger_factory_args=(LOGGER,),
)


class RequestLine:
    """Holds the first audit event of the HTTP request being served by this task until the
    request ends (:meth:`write`), so one line tells both. Events of other tasks that copied the
    request's context, and any after the first, are written at once."""

    __slots__ = ("_event", "_fields", "_open", "_task")

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._event: str | None = None
        self._fields: dict[str, Any] = {}
        self._open = True

    def hold(self, event: str, fields: dict[str, Any]) -> bool:
        if self._event is not None or not self._open or asyncio.current_task() is not self._task:
            return False
        self._event, self._fields = event, fields
        return True

    def write(self, **request: Any) -> bool:
        """Write the held event with the request's fields; False if none was held."""
        event, self._event, self._open = self._event, None, False
        # The task holds its context, which holds this line: left here, the reference back
        # would make every request's task garbage only the cycle collector frees.
        self._task = None
        if event is None:
            return False
        _emit(event, {**self._fields, **request})
        return True


_request_line: ContextVar[RequestLine | None] = ContextVar("audit_request_line", default=None)


def request_line() -> RequestLine:
    """The line of the HTTP request starting in this task (the outermost middleware's)."""
    line = RequestLine()
    _request_line.set(line)
    return line


def record(
    event: str,
    *,
    client: str | None,
    provider: str | None,
    user_id: str | None,
    outcome: str,
    **fields: Any,
) -> None:
    """Write one audit event (``request_id`` comes from the request's context), or hold it for
    its request's line."""
    fields = {
        "client": client,
        "provider": provider,
        "user_id": user_id,
        "outcome": outcome,
        **fields,
    }
    line = _request_line.get()
    if line is None or not line.hold(event, fields):
        _emit(event, fields)


def _emit(event: str, fields: dict[str, Any]) -> None:
    fine = fields["outcome"] in FINE or event == AUTHORIZATION_FINISH
    (_log.info if fine else _log.warning)(event, **fields)


class audited:
    """Record ``event`` when the block ends: ``success``, or the problem code of the exception
    the block raised (re-raised). The block may add fields to (or set ``user_id`` in) the
    yielded dict. A class rather than ``@contextmanager``: it wraps every token request, and a
    generator per request was a measurable part of the hot path (docs/performance.md)."""

    __slots__ = ("_client", "_event", "_fields", "_provider")

    def __init__(
        self, event: str, *, client: str, provider: str, user_id: str | None, **fields: Any
    ) -> None:
        self._event = event
        self._client = client
        self._provider = provider
        self._fields: dict[str, Any] = {"user_id": user_id, **fields}

    def __enter__(self) -> dict[str, Any]:
        return self._fields

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        _: TracebackType | None,
    ) -> None:
        if err is None:
            outcome = SUCCESS
        elif isinstance(err, Exception):
            outcome = err.code if isinstance(err, BrokerError) else "internal_error"
        else:
            return  # cancelled: the client went away, nothing was decided
        event, client, provider = self._event, self._client, self._provider
        record(event, client=client, provider=provider, outcome=outcome, **self._fields)
