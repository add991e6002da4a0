"""Helpers of the key-rotation tests: keys, running ``broker rekey`` in process, reading which
key each stored record is under."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from broker.config import Settings
from broker.crypto import record_key_id
from broker.keys import Keys
from broker.models import Grant
from broker.records import KINDS, primaries, read_blobs, scan
from broker.rekey_cli import RekeyOptions, rekey
from tests.conftest import SECRETS, Broker, BrokerFactory
from tests.test_grant_listing import seed


def new_key(kid: str) -> str:
    material = base64.b64encode(os.urandom(32)).decode()
    SECRETS.add(material)
    return f"{kid}:{material}"


@dataclass
class Run:
    status: int
    out: str
    err: str


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def run_rekey(
    settings: Settings, *, terminal: bool = False, **options: bool | int | None
) -> Run:
    """``broker rekey`` in a thread of its own (its own event loop), so the replicas of the
    test keep serving meanwhile."""
    out = io.StringIO()
    err = FakeTerminal() if terminal else io.StringIO()
    status = await asyncio.to_thread(
        rekey,
        settings,
        RekeyOptions(**options),  # type: ignore[arg-type]
        out=out,
        err=err,
    )
    return Run(status, out.getvalue(), err.getvalue())


async def key_ids(redis: aioredis.Redis, keys: Keys) -> Counter[str]:
    """How many stored records (every kind) name each key id ("?" for an unknown format)."""
    found: Counter[str] = Counter()
    for kind in KINDS:
        for node in await primaries(redis):
            cursor = -1
            while cursor:
                cursor, names = await scan(redis, node, max(cursor, 0), kind.pattern(keys), 500)
                for blob in await read_blobs(redis, kind, names):
                    if isinstance(blob, bytes):
                        found[record_key_id(blob) or "?"] += 1
    return found


async def mid_rotation(
    make_broker: BrokerFactory,
    redis_url: str,
    key_prefix: str,
    grants: list[Grant],
    **settings: Any,
) -> Broker:
    """A broker in the middle of a key rotation: ``grants`` were written under the old key by
    a broker that knew only that one; this one encrypts with a new key and reads both."""
    old, new = new_key("kold"), new_key("knew")
    common = {"redis_url": redis_url, "key_prefix": key_prefix}
    seeder = await make_broker(encryption_keys=old, **common)
    await seed(seeder, grants)
    await seeder.client.close()  # gone, as a replica of the old configuration would be
    return await make_broker(encryption_keys=f"{new},{old}", **settings, **common)
