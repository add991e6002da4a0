"""Grant reads for serving tokens, through the replica's grant cache (``broker/grant_cache.py``):
never for a refresh's decisions, which read Redis under the grant's lock."""

from __future__ import annotations

import asyncio

from broker.errors import GrantUnreadable, StoreUnavailable
from broker.metrics import Metrics
from broker.models import Grant
from broker.store import GrantStore


class CachedReads:
    def __init__(self, store: GrantStore, metrics: Metrics) -> None:
        self._store = store
        self._cache = store.cache
        self._hits = metrics.grant_cache_lookups.labels("hit")
        self._misses = metrics.grant_cache_lookups.labels("miss")
        self._rereads: set[asyncio.Task[None]] = set()  # held: the loop keeps weak references

    async def read(self, provider: str, user_id: str) -> Grant | None:
        """``GrantStore.read``, or the grant this process read lately and has heard no change
        of. A copy in demand late in its life is read again in the background, so a grant in
        steady demand never waits for Redis."""
        key = self._store.keys.grant_key(provider, user_id)
        grant, renew = self._cache.lookup(key)
        if grant is not None:
            self._hits.inc()
            if renew:
                task = asyncio.create_task(self._reread(provider, user_id, key))
                self._rereads.add(task)
                task.add_done_callback(self._rereads.discard)
            return grant
        grant = await self._read_into_cache(provider, user_id, key)
        self._misses.inc()
        return grant

    async def _read_into_cache(self, provider: str, user_id: str, key: str) -> Grant | None:
        generation = self._cache.generation  # a change heard after this: the read is not kept
        grant = await self._store.read(provider, user_id)
        self._cache.put(key, grant, generation)
        return grant

    async def _reread(self, provider: str, user_id: str, key: str) -> None:
        """A cached grant read again before its entry expires. A failure here is left to the
        request that misses next, which answers it."""
        try:
            await self._read_into_cache(provider, user_id, key)
        except (StoreUnavailable, GrantUnreadable):
            pass
        finally:
            self._cache.renewed(key)

    async def settle(self) -> None:
        """Wait for background re-reads (each bounded by the Redis timeout) before closing."""
        if self._rereads:
            await asyncio.wait(self._rereads)
