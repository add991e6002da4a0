"""structlog set-up: JSON lines in production, a readable console on a TTY, one chain for
structlog and standard-library records alike, and a redaction processor as the last guard.

Code never logs tokens or secrets on purpose; redaction catches the mistake of passing one under
a telling name (``access_token=...``) anywhere in an event, nested dicts included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
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


_VERDICTS: dict[object, bool] = {}  # field names are few: each one's verdict, remembered
_SAFE: set[object] = set()  # the names among them that hold no secret
_MAX_VERDICTS = 4096
_PLAIN = frozenset({str, int, float, bool, type(None)})


def sensitive(key: object) -> bool:
    """Whether a field name says it holds a secret: exact names, and telling endings such as
    ``new_refresh_token``, ``x-api-key`` or ``proxy-authorization``."""
    verdict = _VERDICTS.get(key)
    if verdict is None:
        name = str(key).lower()
        verdict = name in SENSITIVE_KEYS or name.endswith(SENSITIVE_SUFFIXES)
        if len(_VERDICTS) < _MAX_VERDICTS:
            _VERDICTS[key] = verdict
            if not verdict:
                _SAFE.add(key)
    return verdict


def _scrub(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if sensitive(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Replace the values of sensitive-looking keys, however deep."""
    # Most lines: every name already judged safe and no container to look into (both checks
    # in C; a third of a line's cost when each field was looked at in turn).
    if _SAFE.issuperset(event) and _PLAIN.issuperset(map(type, event.values())):
        return event
    for key, value in event.items():  # values replaced in place: the dict keeps its size
        if sensitive(key):
            event[key] = REDACTED
        elif type(value) not in _PLAIN and isinstance(value, Mapping | list | tuple):
            event[key] = _scrub(value)
    return event


def _fallback(value: Any) -> Any:
    """What structlog's JSONRenderer writes for a value JSON has no form for."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# One encoder for every line: ``json.dumps(..., default=...)`` builds a new one per call
# (about a tenth of a line).
_ENCODER = json.JSONEncoder(default=_fallback)


def _dumps(event: Any, **_: Any) -> str:
    return _ENCODER.encode(event)


class _Output:
    """Where lines go and how they are rendered: one per process. Loggers are cached on first
    use, so they reach the stream and renderer through this object, which a later
    ``configure_logging`` (tests) updates in place.

    Each line is flushed as it is written: a request's lines reach the file before its answer
    leaves, so a process killed right after answering has still logged (and audited) it.
    Batching the flushes per loop turn saved about 3 µs a request; it was measured and not kept.
    """

    def __init__(self) -> None:
        self.stream: TextIO = sys.stderr
        self.renderer: Processor = structlog.processors.JSONRenderer(_dumps)
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


OUTPUT = _Output()


class _Writer:
    """The logger structlog wraps: a name (``logger`` in every line) and a writer."""

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        OUTPUT.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _writer(*args: Any) -> _Writer:
    return _Writer(str(args[0]) if args else "root")


def _render(logger: WrappedLogger, method: str, event: EventDict) -> str:
    rendered = OUTPUT.renderer(logger, method, event)
    return rendered if isinstance(rendered, str) else str(rendered)


class _StdlibHandler(logging.Handler):
    """Standard-library records (aiohttp, asyncio, redis-py), formatted by the same chain."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            OUTPUT.write(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    worker: int | None = None,
) -> None:
    """structlog's own pipeline (no LogRecord and handler round trip per line, and nothing at
    all for disabled levels) and stdlib records through the same processors, both to
    ``stream``; a ``worker`` of ``broker serve --workers`` marks each line with its number and
    pid. Meant to be called once per process; loggers cached before a later call still follow
    its stream and format (through ``OUTPUT``), not its level."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamp,
        redact,
    ]
    if worker is not None:
        shared.insert(1, _mark_worker(worker, os.getpid()))
    if use_json:
        OUTPUT.renderer = structlog.processors.JSONRenderer(_dumps)
        # Frame locals would print tokens held in local variables: never show them.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    else:
        OUTPUT.renderer = structlog.dev.ConsoleRenderer()
    OUTPUT.stream = stream
    structlog.configure(
        processors=[*shared, _render],
        logger_factory=_writer,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = _StdlibHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _render],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # we log one line per request
    # The audit log (broker.audit) is written whatever log_level says.
    logging.getLogger("broker.audit").setLevel(min(logging.INFO, root.level))


_stamped = (-1, "")  # the last whole second stamped and its text, swapped as one tuple


def _timestamp(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """RFC 3339 UTC with microseconds, as structlog's ``TimeStamper(fmt="iso", utc=True)``
    writes it, with the date and time of day formatted once per second (1.3 -> 0.5 µs)."""
    global _stamped
    now = time.time()
    second, text = _stamped
    if int(now) != second:
        second = int(now)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamped = (second, text)
    event["timestamp"] = f"{text}.{int((now - second) * 1e6):06d}Z"
    return event


def _mark_worker(worker: int, pid: int) -> Processor:
    def mark(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event.setdefault("worker", worker)
        event.setdefault("pid", pid)
        return event

    return mark


def bind_request(request_id: str) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
