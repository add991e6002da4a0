"""structlog set-up: JSON lines in production, a readable console on a TTY, one chain for
structlog and standard-library records alike, and a redaction processor as the last guard.

Code never logs tokens or secrets on purpose; redaction catches the mistake of passing one under
a telling name (``access_token=...``) anywhere in an event, nested dicts included.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"
SENSITIVE_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "code",
        "code_verifier",
        "client_secret",
        "secret",
        "password",
        "authorization",
        "api_key",
        "key",
        "encryption_keys",
        "cookie",
        "set-cookie",
    }
)


SENSITIVE_SUFFIXES = (
    "_token",
    "-token",
    "secret",
    "password",
    "authorization",
    "api_key",
    "api-key",
    "apikey",
    "_verifier",
    "cookie",
)


def sensitive(key: object) -> bool:
    """Whether a field name says it holds a secret: exact names, and telling endings such as
    ``new_refresh_token``, ``x-api-key`` or ``proxy-authorization``."""
    name = str(key).lower()
    return name in SENSITIVE_KEYS or name.endswith(SENSITIVE_SUFFIXES)


def _scrub(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if sensitive(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Replace the values of sensitive-looking keys, however deep."""
    for key, value in list(event.items()):
        if sensitive(key):
            event[key] = REDACTED
        elif isinstance(value, Mapping | list | tuple):
            event[key] = _scrub(value)
    return event


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    worker: int | None = None,
) -> None:
    """Route structlog and stdlib logging through one processor chain to ``stream``; a
    ``worker`` of ``broker serve --workers`` marks each line with its number and pid."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    if worker is not None:
        shared.insert(1, _mark_worker(worker, os.getpid()))
    renderer: Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        # Frame locals would print tokens held in local variables: never show them.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # we log one line per request
    # The audit log (broker.audit) is written whatever log_level says.
    logging.getLogger("broker.audit").setLevel(min(logging.INFO, root.level))


def _mark_worker(worker: int, pid: int) -> Processor:
    def mark(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event.setdefault("worker", worker)
        event.setdefault("pid", pid)
        return event

    return mark


def bind_request(request_id: str) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
