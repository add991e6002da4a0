"""Seeding for bench/run.py: grants written straight into Redis, as broker's own writes leave
them (encrypted records and schedule entries), pipelined as raw RESP over one socket."""

from __future__ import annotations

import secrets
import socket
import statistics
import time

import redis

from broker import grant_record
from broker.crypto import KeyRing, grant_aad
from broker.keys import Keys, member
from broker.models import Grant
from broker.store import INCARNATION_BITS

PROVIDER = "dev"
USER = "user-"
SEED_BATCH = 5000
RT_MARK, AT_MARK = "R" * 43, "A" * 43  # secrets.token_urlsafe(32) is 43 characters


def command(*args: object) -> bytes:
    """One Redis command in RESP, for pipelining without a client's per-command cost."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def seed(
    port: int,
    keyring: KeyRing,
    grants: int,
    now: float,
    record_format: int = 2,
    *,
    host: str = "127.0.0.1",
    prefix: str | None = None,
) -> float:
    """Store ``grants`` fresh grants (``user-0`` ...) with their schedule entries, as broker's
    own writes leave them after a refresh (every timestamp set), in ``record_format``; returns
    the seconds it took. Raw RESP over one socket, pipelined: a million grants in well under a
    minute."""
    keys = Keys() if prefix is None else Keys(prefix)
    expires = now + 86_400
    due = now + 80_000  # none comes due during the benchmark
    version = str((1 << INCARNATION_BITS) + 1).encode()
    schedule = keys.schedule_key(PROVIDER).encode()
    expiry_index = keys.rt_expiry_key(PROVIDER).encode()
    # Placeholders as long as the tokens that replace them: a record holds string lengths.
    template = grant_record.encode(
        Grant(
            provider=PROVIDER,
            user_id="",
            refresh_token=RT_MARK,
            access_token=AT_MARK,
            access_expires_at=expires,
            access_issued_at=now,
            scope="offline_access",
            next_refresh_at=due,
            last_refreshed_at=now,
            refresh_count=1,
            refresh_token_issued_at=now,
            refresh_token_expires_at=now + 28 * 86_400,
            created_at=now,
            updated_at=now,
        ),
        record_format,
    )
    created, rt_expiry = repr(now).encode(), repr(now + 28 * 86_400).encode()
    started = time.perf_counter()
    with socket.create_connection((host, port)) as sock:
        stream = sock.makefile("rb")
        for first in range(0, grants, SEED_BATCH):
            out = []
            last = min(first + SEED_BATCH, grants)
            for i in range(first, last):
                user_id = f"{USER}{i}"
                payload = template.replace(RT_MARK.encode(), secrets.token_urlsafe(32).encode())
                payload = payload.replace(AT_MARK.encode(), secrets.token_urlsafe(32).encode())
                blob = keyring.encrypt(payload, grant_aad(PROVIDER, user_id))
                m = member(user_id)
                key = keys.member_grant_key(PROVIDER, m)
                out.append(
                    command(
                        b"HSET",
                        key,
                        b"v",
                        version,
                        b"blob",
                        blob,
                        b"due",
                        repr(due),
                        b"st",
                        b"active",
                        b"c",
                        created,
                        b"rx",
                        rt_expiry,
                    )
                )
                out.append(command(b"ZADD", schedule, repr(due), m))
                out.append(command(b"ZADD", expiry_index, rt_expiry, m))
            sock.sendall(b"".join(out))
            for _ in range(3 * (last - first)):
                reply = stream.readline()
                if reply.startswith(b"-"):
                    raise SystemExit(f"seeding failed: {reply.decode().strip()}")
    return time.perf_counter() - started


def redis_bytes_per_grant(port: int, grants: int, used_before: int) -> tuple[float, float]:
    """(MEMORY USAGE of a sample of grant hashes plus their schedule and refresh-token expiry
    entries, used_memory growth per grant while seeding)."""
    client = redis.Redis(port=port)
    keys = Keys()
    sample = [f"{USER}{i * max(1, grants // 100)}" for i in range(min(100, grants))]
    per_hash = statistics.mean(
        int(client.memory_usage(keys.grant_key(PROVIDER, u), samples=0) or 0) for u in sample
    )
    indexes = sum(
        int(client.memory_usage(key, samples=0) or 0)
        for key in (keys.schedule_key(PROVIDER), keys.rt_expiry_key(PROVIDER))
    )
    used = int(client.info("memory")["used_memory"]) - used_before
    client.close()
    return per_hash + indexes / grants, used / grants
