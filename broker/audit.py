"""The audit log: one structured event per security-relevant action, for a SIEM.

Every event goes to the logger ``broker.audit`` (never filtered by ``log_level``, see
``broker.logs``) with the fields ``event``, ``client``, ``provider``, ``user_id``, ``outcome``
(``success``, or the problem ``code`` the client got) and ``request_id`` (bound per request by
``broker.logs.bind_request``), plus action-specific fields. docs/audit.md lists every event and
field; add an event there when you add one here. Never pass a token, key or secret.
"""

from __future__ import annotations

import logging
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


def record(
    event: str,
    *,
    client: str | None,
    provider: str | None,
    user_id: str | None,
    outcome: str,
    **fields: Any,
) -> None:
    """Write one audit event (``request_id`` comes from the request's context)."""
    fine = outcome in FINE or event == AUTHORIZATION_FINISH
    emit = _log.info if fine else _log.warning
    emit(event, client=client, provider=provider, user_id=user_id, outcome=outcome, **fields)


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
