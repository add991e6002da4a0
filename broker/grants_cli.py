"""``broker grants list``: one provider's grant statuses, read straight from Redis with the
configured settings and keys, page by page as ``GET /v1/grants/{provider}`` reads them."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TextIO

from broker.config import Settings
from broker.crypto import KeyRing
from broker.errors import BrokerError
from broker.grant_codec import GrantCodec
from broker.keys import Keys
from broker.listing import MAX_LIMIT, GrantListing
from broker.metrics import Metrics
from broker.models import Grant, GrantState
from broker.redis_client import Guard, connect
from broker.schedule import ScheduleIndex
from broker.store import GrantStore

HEADER = ("STATE", "ACCESS EXPIRES AT", "NEXT REFRESH AT", "FAILURES", "USER ID")
ROW = "{:<16} {:<20} {:<20} {:>8}  {}"


def list_grants(
    settings: Settings,
    provider: str,
    state: GrantState | None,
    *,
    as_json: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Print every grant of ``provider`` once (a table, or JSON lines); the exit status: 0,
    or 1 when Redis failed, 2 when the settings cannot list anything."""
    if provider not in settings.providers:
        known = ", ".join(settings.providers) or "none"
        print(f"broker: no provider {provider!r} is configured (known: {known})", file=err)
        return 2
    if settings.is_memory_store:
        print(
            "broker: redis_url is memory://: the embedded store lives in the serving process "
            "only; there is nothing to list from here",
            file=err,
        )
        return 2
    if settings.ephemeral_encryption_key:
        print("broker: set BROKER_ENCRYPTION_KEYS to the keys the service uses", file=err)
        return 2
    try:
        return asyncio.run(_list(settings, provider, state, as_json, out, err))
    except BrokerError as error:
        print(f"broker: {error.detail}", file=err)
        return 1


async def _list(
    settings: Settings,
    provider: str,
    state: GrantState | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    redis = connect(settings)
    try:
        metrics = Metrics()
        keys = Keys(settings.key_prefix, settings.schedule_shards)
        guard = Guard(metrics, settings.store_retry_after)
        schedule = ScheduleIndex(redis, keys, guard, metrics, settings.schedule_shards)
        codec = GrantCodec(KeyRing(settings.encryption_keys), metrics)
        store = GrantStore(redis, codec, keys, guard, schedule)
        listing = GrantListing(store)
        seen: set[str] = set()  # a listing may repeat a grant that changed meanwhile
        unreadable: set[str] = set()
        if not as_json:
            print(ROW.format(*HEADER), file=out)
        cursor: str | None = None
        while True:
            page = await listing.page(provider, state, MAX_LIMIT, cursor)
            for grant in page.grants:
                if grant.user_id not in seen:
                    seen.add(grant.user_id)
                    print(_line(grant, as_json), file=out)
            unreadable.update(page.unreadable)
            cursor = page.next_cursor
            if cursor is None:
                break
    finally:
        await redis.aclose()
    if not as_json:
        print(f"({len(seen)} grant{'' if len(seen) == 1 else 's'})", file=out)
    if unreadable:
        names = ", ".join(repr(user_id) for user_id in sorted(unreadable))
        print(f"broker: {len(unreadable)} record(s) could not be decrypted: {names}", file=err)
    return 0


def _line(grant: Grant, as_json: bool) -> str:
    status = grant.status()
    if as_json:
        return json.dumps(status, ensure_ascii=False)
    return ROW.format(
        status["state"],
        status["access_expires_at"] or "-",
        status["next_refresh_at"] or "-",
        status["consecutive_failures"],
        status["user_id"],
    )
