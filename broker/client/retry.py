"""How long the client waits before asking the broker again, and when it gives up."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["RetryPolicy", "parse_retry_after"]

DEFAULT_ATTEMPTS = 4  # one request and up to three retries
DEFAULT_MAX_WAIT = 10.0  # seconds of waiting in all, per call
DEFAULT_BACKOFF = 0.2  # seconds before the first retry when the broker did not say
DEFAULT_MAX_BACKOFF = 2.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of ``429 rate_limited``, ``503 upstream_unavailable``/``store_unavailable`` and
    of a broker that could not be reached.

    A retry waits what the answer's ``Retry-After`` says, else an exponential backoff with full
    jitter; a call gives up (raising the last error) after ``attempts`` requests or as soon as
    the next wait would take its total waiting past ``max_wait`` seconds.
    ``RetryPolicy(attempts=1)`` never retries.
    """

    attempts: int = DEFAULT_ATTEMPTS
    max_wait: float = DEFAULT_MAX_WAIT
    backoff: float = DEFAULT_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.max_wait, self.backoff, self.max_backoff) < 0:
            raise ValueError("waits cannot be negative")

    def wait(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...)."""
        if retry_after is not None:
            return retry_after
        ceiling = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not a secret


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date, RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)
