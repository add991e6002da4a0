"""``broker rekey``: the command around ``broker/rekey.py``: progress (a rich bar on a terminal,
plain lines otherwise, nothing with ``--quiet``), the summary, the audit event and the exit
status, which is 0 only when every record is under the primary key."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from redis.exceptions import RedisClusterException, RedisError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from broker import audit
from broker.census import publish
from broker.config import Settings
from broker.crypto import KeyRing
from broker.key_roster import encrypting
from broker.keys import Keys
from broker.redis_client import close, connect
from broker.rekey import Rekeyer, RekeyReport

OK, REMAINING, CONFIG, UNREADABLE, BEHIND, INTERRUPTED = 0, 1, 2, 3, 4, 130
PLAIN_EVERY = 2.0  # seconds between two plain progress lines


@dataclass(frozen=True, slots=True)
class RekeyOptions:
    dry_run: bool = False
    quiet: bool = False
    limit: int | None = None


def rekey(
    settings: Settings,
    options: RekeyOptions,
    *,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run a rekey with these settings; the exit status (see docs/operations.md)."""
    if settings.is_memory_store:
        print(
            "broker: redis_url is memory://: the embedded store lives in the serving process "
            "only; there is nothing to re-encrypt from here",
            file=err,
        )
        return CONFIG
    if settings.ephemeral_encryption_key:
        print("broker: set BROKER_ENCRYPTION_KEYS to the keys the service uses", file=err)
        return CONFIG
    keyring = KeyRing(settings.encryption_keys)
    holder: list[RekeyReport] = []
    started = time.time()
    try:
        report = asyncio.run(_run(settings, keyring, options, err, holder, started))
    except KeyboardInterrupt:
        partial = holder[0] if holder else RekeyReport()
        _finish(partial, options, "interrupted", keyring, out)
        print("broker: interrupted; run `broker rekey` again: it resumes", file=err)
        return INTERRUPTED
    except (RedisError, RedisClusterException) as error:
        partial = holder[0] if holder else RekeyReport()
        _finish(partial, options, "failed", keyring, out)
        print(
            f"broker: Redis failed ({type(error).__name__}); run `broker rekey` again: it resumes",
            file=err,
        )
        return REMAINING
    if report.behind:
        _finish(report, options, "refused", keyring, out)
        print(_behind(report.behind, keyring.primary_id), file=err)
        return BEHIND
    if report.interrupted:
        _finish(report, options, "interrupted", keyring, out)
        print("broker: interrupted; run `broker rekey` again: it resumes", file=err)
        return INTERRUPTED
    if report.unreadable:
        outcome, status = "unreadable", UNREADABLE
    elif report.clean:
        outcome, status = "complete", OK
    else:
        outcome, status = ("dry_run" if options.dry_run else "incomplete"), REMAINING
    _finish(report, options, outcome, keyring, out)
    if status or not options.quiet:
        print(_verdict(report, options, keyring.primary_id), file=err if status else out)
    return status


async def _run(
    settings: Settings,
    keyring: KeyRing,
    options: RekeyOptions,
    err: TextIO,
    holder: list[RekeyReport],
    started: float,
) -> RekeyReport:
    redis = connect(settings)
    try:
        keys = Keys(settings.key_prefix, settings.schedule_shards)
        shown = _Progress(err, options.quiet)
        stop = asyncio.Event()
        _stop_on_sigint(stop)
        rekeyer = Rekeyer(
            redis,
            keys,
            keyring,
            dry_run=options.dry_run,
            limit=options.limit,
            min_replicas=settings.min_replicas_to_ack,
            ack_timeout=settings.replica_ack_timeout,
            on_progress=shown.update,
            stop=stop,
        )
        holder.append(rekeyer.report)
        # A process still encrypting with another key would write records under it after
        # this run: refuse before changing anything (a dry run only says so).
        behind = {
            process: key_id
            for process, key_id in (await encrypting(redis, keys)).items()
            if key_id != keyring.primary_id
        }
        if behind and not options.dry_run:
            rekeyer.report.behind = behind
            return rekeyer.report
        if behind:
            print(_behind(behind, keyring.primary_id), file=err)
        if not options.quiet:
            shown.start(await rekeyer.total())
        try:
            report = await rekeyer.run()
        finally:
            shown.stop(rekeyer.report)
        if report.complete and not options.dry_run:
            await publish(redis, keys, report.by_key, started)
        return report
    finally:
        await close(redis)


def _stop_on_sigint(stop: asyncio.Event) -> None:
    """The first Ctrl-C stops after the batch in hand (an exact summary); a second one, the
    default way. Only the main thread can take signals (tests run this in another)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()

    def first() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, first)


class _Progress:
    """A rich bar on a terminal; a plain line every ``PLAIN_EVERY`` seconds otherwise."""

    def __init__(self, err: TextIO, quiet: bool) -> None:
        self._err = err
        self._quiet = quiet
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._total = 0
        self._began = self._last = 0.0
        self._shown: tuple[int, int, int] | None = None

    def start(self, total: int) -> None:
        self._total = total
        self._began = time.monotonic()
        if self._err.isatty():
            self._bar = Progress(
                TextColumn("rekey"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=self._err),
            )
            self._task = self._bar.add_task("rekey", total=total, counts="", rate="")
            self._bar.start()

    def update(self, report: RekeyReport) -> None:
        if self._quiet:
            return
        now = time.monotonic()
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task,
                completed=report.scanned,
                counts=f"{report.rewritten} rewritten",
                rate=f"{self._rate(report, now):.0f}/s",
            )
        elif self._last == 0.0 or now - self._last >= PLAIN_EVERY:
            self._line(report, now)

    def stop(self, report: RekeyReport) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.stop()
        else:
            self._line(report, time.monotonic())

    def _rate(self, report: RekeyReport, now: float) -> float:
        return report.scanned / max(now - self._began, 1e-3)

    def _line(self, report: RekeyReport, now: float) -> None:
        self._last = now
        counts = (report.scanned, report.rewritten, report.current)
        if counts == self._shown:
            return
        self._shown = counts
        rate = self._rate(report, now)
        left = max(self._total - report.scanned, 0)
        eta = f"about {left / rate:.0f} s left" if rate > 0 and left else "0 s left"
        print(
            f"rekey: {report.scanned}/{self._total} records, {report.rewritten} rewritten, "
            f"{report.current} already current, {rate:.0f}/s, {eta}",
            file=self._err,
            flush=True,
        )


def _finish(
    report: RekeyReport, options: RekeyOptions, outcome: str, keyring: KeyRing, out: TextIO
) -> None:
    audit.record(
        audit.REKEY_FINISH,
        client=None,
        provider=None,
        user_id=None,
        outcome=outcome,
        dry_run=options.dry_run,
        primary_key_id=keyring.primary_id,
        scanned=report.scanned,
        rewritten=report.rewritten,
        already_current=report.current,
        changed_concurrently=report.changed,
        unreadable=report.unreadable,
        remaining=report.remaining,
    )
    if options.quiet:
        return
    rows = [
        ("scanned", report.scanned),
        (
            "would be rewritten" if options.dry_run else "rewritten",
            report.remaining if options.dry_run else report.rewritten,
        ),
        ("already current", report.current),
        ("changed concurrently (kept)", report.changed),
        ("unreadable", report.unreadable),
    ]
    if not options.dry_run:
        rows.append(("left under another key", report.remaining))
    if report.unconfirmed:  # a failover now could undo those: a --dry-run afterwards tells
        rows.append(("unconfirmed by replicas", report.unconfirmed))
    print(f"rekey {outcome}{' (dry run: nothing written)' if options.dry_run else ''}:", file=out)
    for name, count in rows:
        print(f"  {name + ':':<30}{count:>10}", file=out)
    by_key = ", ".join(f"{kid}={n}" for kid, n in sorted(report.by_key.items()))
    print(f"  {'records by key:':<30}{by_key or '-':>10}", file=out)


def _behind(behind: dict[str, str], primary: str) -> str:
    processes = ", ".join(f"{process} ({key_id})" for process, key_id in sorted(behind.items()))
    return (
        f"broker: {len(behind)} running process(es) encrypt with another key than {primary}: "
        f"{processes}. Put {primary} first on every replica and restart them (a stopped "
        "process drops out of this list within 30 s), then run `broker rekey` again; "
        "nothing was re-encrypted"
    )


def _verdict(report: RekeyReport, options: RekeyOptions, primary: str) -> str:
    if report.unreadable:
        return (
            f"broker: {report.unreadable} record(s) cannot be decrypted with the configured keys "
            "(logged as record.unreadable security events): restore the key they name, or "
            "delete or re-import those grants; do not remove any key yet"
        )
    if report.clean:
        return (
            f"every record is under key {primary}: other keys can be removed from "
            "BROKER_ENCRYPTION_KEYS once every replica runs with this key first"
        )
    if options.dry_run:
        return f"broker: {report.remaining} record(s) are under another key than {primary}"
    if report.limited:
        return (
            f"broker: stopped at --limit with {report.remaining} or more record(s) under "
            "another key; run it again"
        )
    hint = ""
    if report.old_key_writes:
        hint = (
            f" ({report.old_key_writes} were written under an old key during the run: a "
            f"replica still encrypts with another key than {primary}; roll the configuration "
            "out to every replica first)"
        )
    return f"broker: {report.remaining} record(s) are still under another key{hint}; run it again"
