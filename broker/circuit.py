"""A circuit breaker per provider: stop calling a provider that keeps failing, probe it later.

Closed: calls go through. After ``threshold`` consecutive transient failures it opens: no calls
for ``open_for`` seconds (callers get the still-valid token or a 503 at once, instead of a retry
storm). Then half-open: one probe goes through; its success closes the circuit, its failure
opens it again. State is per replica: each replica protects the provider from itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[CircuitState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    def __init__(
        self, threshold: int, open_for: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = threshold
        self._open_for = open_for
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._state: CircuitState = "closed"
        self.last_reason: str | None = None  # of the last failure, for grants it leaves failing

    @property
    def state(self) -> CircuitState:
        if self._state == "open" and self._clock() >= self._opened_at + self._open_for:
            return "half_open"
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the provider now (claims the probe when half-open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._state, self._probing = "half_open", True
            return True
        return False

    def retry_after(self) -> float:
        return max(1.0, self._opened_at + self._open_for - self._clock())

    def record_success(self) -> bool:
        """The provider answered (tokens, or a definite rejection): it is up. True if that
        closed an open circuit (the probe succeeded)."""
        recovered = self._state != "closed"
        self._state, self._failures, self._probing = "closed", 0, False
        return recovered

    def record_failure(self, reason: str | None = None) -> None:
        self.last_reason = reason
        self._failures += 1
        if self._state == "half_open" or self._failures >= self._threshold:
            self._state, self._opened_at, self._probing = "open", self._clock(), False

    def release_probe(self) -> None:
        """The probe ended without an answer either way (cancelled): let another one go."""
        self._probing = False
