"""The refresh timing and retry rules, kept apart from the machinery that applies them."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Protocol

from broker.config import Settings
from broker.models import Grant, TokenSet, refresh_due_at


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    lead: float
    jitter_max: float
    failures_before_failing: int
    provider_timeout: float = 10.0
    rotated_write_window: float = 45.0
    retry_base: float = 1.0
    retry_max: float = 300.0
    circuit_failures: int = 5
    circuit_open_for: float = 5.0

    @classmethod
    def from_settings(cls, s: Settings) -> RefreshPolicy:
        return cls(
            lead=s.refresh_lead,
            jitter_max=s.refresh_jitter_max,
            failures_before_failing=s.failures_before_failing,
            provider_timeout=s.provider_timeout,
            rotated_write_window=s.rotated_write_window,
            retry_base=s.retry_base,
            retry_max=s.retry_max,
            circuit_failures=s.circuit_failures,
            circuit_open_for=s.circuit_open_for,
        )

    @property
    def call_budget(self) -> float:
        """How long the lock must stay ours when a provider call starts: the call, then the
        write of what it returned."""
        return self.provider_timeout + self.rotated_write_window

    def stamped(
        self,
        grant: Grant,
        tokens: TokenSet,
        *,
        refreshed: bool,
        requested_at: float,
        max_age: float | None,
    ) -> Grant:
        """``grant`` holding ``tokens``, scheduled per the refresh-timing rule, its refresh
        token's expiry stamped when the provider states a maximum age (``max_age``). Lifetimes
        count from ``requested_at``, when we asked: the provider's clock started no earlier, so
        we never believe a token lives longer than the provider does."""
        now = requested_at
        due = refresh_due_at(
            now + tokens.expires_in, tokens.expires_in, lead=self.lead, jitter_max=self.jitter_max
        )
        new = grant.with_tokens(tokens, now, next_refresh_at=due, refreshed=refreshed)
        if not new.refreshable:
            # Never refreshed: indexed at its stated expiry only, to be marked then.
            return replace(new, next_refresh_at=new.access_expires_at)
        if max_age is not None and new.refresh_token_issued_at is not None:
            new = replace(new, refresh_token_expires_at=new.refresh_token_issued_at + max_age)
        return new

    def retry_delay(self, failures: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, never sooner than the provider's Retry-After
        and never sooner than half the base delay (no tight loops)."""
        ceiling = min(self.retry_max, self.retry_base * 2 ** max(0, failures - 1))
        delay = random.uniform(self.retry_base / 2, max(self.retry_base / 2, ceiling))  # noqa: S311
        return max(delay, retry_after or 0.0)


class HeldToken(Protocol):
    """An access token held for handing out: a grant's, or an app token."""

    def valid_for(self, now: float) -> float: ...

    def lifetime(self) -> float | None: ...


def fresh_enough(grant: HeldToken, min_ttl: float, now: float) -> bool:
    """Whether the held token lasts ``min_ttl`` more seconds. A ``min_ttl`` the provider's
    lifetime cannot meet is capped at half that lifetime: the freshest token the broker can
    hold without refreshing more than once per half lifetime."""
    remaining = grant.valid_for(now)
    lifetime = grant.lifetime()
    needed = min_ttl if lifetime is None or min_ttl < lifetime else lifetime / 2
    return remaining > 0 and remaining >= needed
