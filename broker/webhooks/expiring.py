"""``grant.refresh_token_expiring``: once per refresh token, when it comes within
``refresh_token_warn_before`` of the provider's ``refresh_token_max_age``.

No state changes then, so no grant write records it: replicas look at the refresh-token-expiry
index (``broker/schedule.py``) every minute. ``ZADD CH`` of the token's expiry into a "warned"
set is the claim: of several replicas only the first changes it, and only it appends the event
(a new refresh token has a new expiry, so it is warned about again). The claim and the append
are two steps: a replica killed between them loses that one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from broker.errors import GrantUnreadable, StoreUnavailable
from broker.keys import user_id_of
from broker.models import iso, iso_ms
from broker.store import GrantStore

log = structlog.get_logger(__name__)

CHECK_EVERY = 60.0  # seconds
BATCH = 200  # expiring grants looked at per provider and turn
FORGET_AFTER = 86400.0  # seconds after its expiry that a warning is remembered

EVENT = "grant.refresh_token_expiring"


class ExpiryWatch:
    def __init__(
        self,
        store: GrantStore,
        providers: Sequence[str],
        warn_before: float,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._providers = providers
        self._warn_before = warn_before
        self._clock = clock

    def warned_key(self, provider: str) -> str:
        return self._store.keys.rt_expiry_key(provider) + ":warned"

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.check()
            except StoreUnavailable:
                log.warning("webhook.expiry_check_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), CHECK_EVERY)

    async def check(self) -> int:
        """Append the event for each grant newly within the warning; returns how many."""
        now, appended = self._clock(), 0
        redis = self._store.redis
        for provider in self._providers:
            warned = self.warned_key(provider)
            with self._store.guard("event"):
                await redis.zremrangebyscore(warned, "-inf", now - FORGET_AFTER)
                due: Any = await redis.zrangebyscore(
                    self._store.keys.rt_expiry_key(provider),
                    "-inf",
                    now + self._warn_before,
                    start=0,
                    num=BATCH,
                    withscores=True,
                )
            for m, expires_at in due:  # (member, expiry)
                with self._store.guard("event"):
                    if not await redis.zadd(warned, {m: expires_at}, ch=True):
                        continue  # warned already (by any replica)
                appended += await self._append(provider, user_id_of(m), expires_at, now)
        return appended

    async def _append(self, provider: str, user_id: str, expires_at: float, now: float) -> int:
        try:
            grant = await self._store.read(provider, user_id)
        except GrantUnreadable:
            return 0
        if grant is None:
            return 0
        data = {
            "provider": provider,
            "user_id": user_id,
            "state": grant.state,
            "last_error": grant.last_error,
            "refresh_token_expires_at": iso(expires_at),
        }
        body = json.dumps(
            {"type": EVENT, "timestamp": iso_ms(now), "data": data},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        await self._store.events.add(EVENT, provider, body)
        return 1
