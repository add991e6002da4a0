"""One claimed grant's refresh: its claim kept while the refresh runs, and its schedule entry
put right whatever the outcome, so that a claim never stands in for a grant's real due time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from broker.errors import (
    BrokerError,
    GrantNotFound,
    GrantUnreadable,
    ReauthRequired,
    StoreUnavailable,
    Unavailable,
)
from broker.locks import LockBusy
from broker.providers import ProviderRegistry
from broker.rearm import Rearming
from broker.refresh import Refresher
from broker.schedule import ScheduleIndex

# The scheduler's logger: these lines were its own before they moved here.
log = structlog.get_logger("broker.scheduler")

BUSY_MARGIN = 0.05  # after a busy lock's expiry, so the next claim finds it free
UNREADABLE_RETRY = 3600.0  # a record that fails decryption waits for an operator (key restore)


class ClaimedRefresh:
    def __init__(
        self,
        schedule: ScheduleIndex,
        refresher: Refresher,
        providers: ProviderRegistry,
        lease: float,
        clock: Callable[[], float],
    ) -> None:
        self._schedule = schedule
        self._refresher = refresher
        self._providers = providers
        self._lease = lease
        self._clock = clock

    async def run(self, provider: str, user_id: str, lease: float) -> None:
        """Refresh a grant claimed until ``lease``; its schedule entry ends right whatever
        happens (refreshed, skipped, busy elsewhere, failed, cancelled)."""
        keeper = LeaseKeeper(self._schedule, provider, user_id, lease, self._lease, self._clock)
        try:
            grant, stored = await self._refresher.refresh_scheduled(provider, user_id)
            # Refreshed and stored here: that write's index update replaced our lease (if the
            # update was lost, the lease ends and the next claim finds the grant not due).
            if grant.next_refresh_at is not None and not stored:
                # Skipped (not due after all, refreshed elsewhere, circuit open): our lease must
                # not stand in for the real due time. A write that rescheduled it already wins.
                held, now = await keeper.stop(), self._clock()
                to = grant.next_refresh_at
                if to <= now:  # overdue and still not refreshed: not again at once
                    to = now + self._retry_after(provider)
                await self._schedule.move_lease(provider, user_id, held, to)
        except (ReauthRequired, GrantNotFound):
            # The write (or delete) normally took it off the schedule; if that update was
            # lost, this stale entry would come due every lease: drop it (if still ours).
            await self._schedule.move_lease(provider, user_id, await keeper.stop(), None)
        except LockBusy as err:
            # Being refreshed elsewhere (or a dead replica's lock running out): look again
            # when that lock has expired at the latest, not at every tick.
            held = await keeper.stop()
            to = self._clock() + err.busy_for + BUSY_MARGIN
            with contextlib.suppress(StoreUnavailable):
                await self._schedule.move_lease(provider, user_id, held, to)
        except GrantUnreadable:
            log.error(
                "security.grant_unreadable", provider=provider, user_id=user_id, trigger="scheduled"
            )
            held = await keeper.stop()
            await self._schedule.move_lease(
                provider, user_id, held, self._clock() + UNREADABLE_RETRY
            )
        except Unavailable as err:
            # Transient: the failure and its retry time were recorded on the grant (that write
            # rescheduled it); if not, try again after the provider's or the store's delay.
            log.info(
                "scheduler.refresh_deferred", provider=provider, user_id=user_id, problem=err.code
            )
            retry = self._clock() + max(err.retry_after, self._retry_after(provider))
            with contextlib.suppress(StoreUnavailable):
                await self._schedule.move_lease(provider, user_id, await keeper.stop(), retry)
        except BrokerError as err:
            log.info(
                "scheduler.refresh_deferred", provider=provider, user_id=user_id, problem=err.code
            )
        except asyncio.CancelledError:
            # Shutdown ran out of drain time: hand the claim back so another replica takes it
            # now (the refresh itself, if it reached the provider, still finishes and writes).
            held = await keeper.stop()
            with contextlib.suppress(StoreUnavailable):
                await self._schedule.move_lease(provider, user_id, held, self._clock())
            raise
        except Exception:
            log.exception("scheduler.refresh_crashed", provider=provider, user_id=user_id)
        finally:
            await keeper.stop()

    def _retry_after(self, provider: str) -> float:
        """The soonest an overdue grant that was skipped is worth claiming again: after the
        next probe while its provider's circuit is open, after one lease otherwise."""
        breaker = self._providers.breaker(provider)
        if breaker.state == "closed":
            return self._lease
        return max(self._lease, breaker.retry_after())


class LeaseKeeper:
    """Renews a claim every third of its length while its refresh runs, and knows the score
    it holds (``broker/rearm.py``: a timer between renewals, a task only for a renewal)."""

    def __init__(
        self,
        schedule: ScheduleIndex,
        provider: str,
        user_id: str,
        score: float,
        length: float,
        clock: Callable[[], float],
    ) -> None:
        self._schedule = schedule
        self._provider = provider
        self._user_id = user_id
        self.score = score
        self._length = length
        self._clock = clock
        self._rearming = Rearming(length / 3, self._renew)

    async def _renew(self) -> float | None:
        """The delay to the next renewal; None: no more."""
        renewed = self._clock() + self._length
        try:
            moved = await self._schedule.move_lease(
                self._provider, self._user_id, self.score, renewed
            )
        except StoreUnavailable:
            return self._length / 3  # whether it moved is unknown: try again
        if not moved:
            return None  # rescheduled by a write: nothing left to hold
        self.score = renewed
        return self._length / 3

    async def stop(self) -> float:
        """Stop renewing; the score held now."""
        await self._rearming.stop()
        return self.score
