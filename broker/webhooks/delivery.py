"""Delivery to each receiver from this replica: bounded concurrency and time per receiver,
retries with backoff for 24 hours, and a receiver that is down never holds up another (each has
its own loop and its own slots).

Order is not kept: a retried event may arrive after newer ones; receivers deduplicate by
``webhook-id`` and order by ``timestamp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Sequence

import aiohttp
import structlog

from broker.errors import StoreUnavailable
from broker.metrics import Metrics
from broker.settings_webhooks import WebhookSettings
from broker.webhooks.signing import signed_headers, webhook_id
from broker.webhooks.stream import CONSUMER_GONE_AFTER, Entry, EventStream

log = structlog.get_logger(__name__)

DELIVERY_WINDOW = 24 * 3600.0  # seconds an event is retried before it is given up
RETRY_MAX = 3600.0  # the longest wait between two attempts
IDLE_POLL = 0.5  # seconds between two looks at the stream when there is nothing to do
STORE_PAUSE = 2.0  # seconds before trying again after Redis failed
GAUGE_INTERVAL = 5.0  # seconds between two updates of the backlog gauges
USER_AGENT = "broker-webhooks (Standard Webhooks)"


def retry_after(attempts: int, timeout: float) -> float:
    """Seconds an entry waits after its ``attempts``-th attempt: ``timeout + 1`` doubling up to
    an hour. Never less than ``timeout + 1``: an attempt still running (idle since it was
    claimed) is not claimed by another replica."""
    first = timeout + 1.0
    return min(first * 2.0 ** min(max(attempts - 1, 0), 20), max(RETRY_MAX, first))


def group_of(hook: WebhookSettings) -> str:
    return f"webhook:{hook.label}"


class Receiver:
    """One receiver's deliveries from this replica."""

    def __init__(
        self,
        hook: WebhookSettings,
        stream: EventStream,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        consumer: str,
        clock: Callable[[], float],
    ) -> None:
        self.hook = hook
        self._stream = stream
        self._session = session
        self._metrics = metrics
        self._consumer = consumer
        self._clock = clock
        self._group = group_of(hook)
        self._key = hook.key()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._gauges_at = 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        ready = False
        while not stopping.is_set():
            busy, pause = False, IDLE_POLL
            try:
                if not ready:
                    await self._stream.ensure_group(self._group)
                    ready = True
                busy = await self._turn()
            except StoreUnavailable:
                ready = False  # the stream may have been deleted: create the group again
                pause = STORE_PAUSE
                log.warning("webhook.store_unavailable", webhook=self.hook.label)
            except Exception:  # a background loop outlives a surprise; the entry stays pending
                pause = STORE_PAUSE
                log.exception("webhook.loop_failed", webhook=self.hook.label)
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), pause)

    async def _turn(self) -> bool:
        """Start what is due (retries first, then new events) in the free slots."""
        free = self.hook.max_concurrency - len(self._in_flight)
        entries: list[Entry] = []
        if free > 0:
            entries += await self._stream.claim_due(
                self._group, self._consumer, free, self._retry_after
            )
        if free - len(entries) > 0:
            entries += await self._stream.read_new(self._group, self._consumer, free - len(entries))
        for entry in entries:
            if not self.hook.wants(entry.type, entry.provider):
                await self._stream.ack(self._group, entry.id)
                continue
            task = asyncio.create_task(self._deliver(entry))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if self._clock() >= self._gauges_at:
            self._gauges_at = self._clock() + GAUGE_INTERVAL
            await self._update_gauges()
            forgotten = await self._stream.forget_gone_consumers(
                self._group, self._consumer, CONSUMER_GONE_AFTER
            )
            if forgotten:
                log.info("webhook.consumers_forgotten", webhook=self.hook.label, count=forgotten)
        return free > 0 and bool(entries)

    def _retry_after(self, attempts: int) -> float:
        return retry_after(attempts, self.hook.timeout)

    async def _deliver(self, entry: Entry) -> None:
        now = self._clock()
        if now - entry.created > DELIVERY_WINDOW:
            outcome = "expired"
            log.error("webhook.given_up", webhook=self.hook.label, id=entry.id, type=entry.type)
        else:
            outcome = await self._post(entry, now)
        self._metrics.webhook_deliveries.labels(self.hook.label, outcome).inc()
        try:
            if outcome in ("success", "expired"):
                await self._stream.ack(self._group, entry.id)
            else:
                await self._stream.retry_later(self._group, self._consumer, entry.id)
        except StoreUnavailable:
            # pending still: delivered again later (at least once)
            log.warning("webhook.ack_failed", webhook=self.hook.label, id=entry.id)

    async def _post(self, entry: Entry, now: float) -> str:
        headers = signed_headers(self._key, webhook_id(entry.id), entry.body, now)
        timeout = aiohttp.ClientTimeout(total=self.hook.timeout)
        try:
            async with self._session.post(
                self.hook.url,
                data=entry.body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            log.warning(
                "webhook.delivery_failed",
                webhook=self.hook.label,
                id=entry.id,
                attempt=entry.attempts,
                reason=type(err).__name__,
            )
            return "error"
        if 200 <= status < 300:
            return "success"
        log.warning(
            "webhook.delivery_refused",
            webhook=self.hook.label,
            id=entry.id,
            attempt=entry.attempts,
            status=status,
        )
        return "refused"

    async def _update_gauges(self) -> None:
        pending, oldest = await self._stream.backlog(self._group)
        age = 0.0
        if oldest is not None:
            age = max(0.0, self._clock() - int(oldest.partition("-")[0]) / 1000)
        self._metrics.webhook_oldest_undelivered.labels(self.hook.label).set(age)
        self._metrics.webhook_pending.labels(self.hook.label).set(pending)

    async def drain(self, budget: float) -> None:
        """Let attempts in flight finish within ``budget``; the rest stay pending (another
        replica, or this one after a restart, delivers them)."""
        if self._in_flight and budget > 0:
            await asyncio.wait(list(self._in_flight), timeout=budget)
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))


class WebhookService:
    """Every receiver's loop, run in the background of each replica."""

    def __init__(
        self,
        hooks: Sequence[WebhookSettings],
        stream: EventStream,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._hooks = hooks
        self._stream = stream
        self._metrics = metrics
        self._clock = clock
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._receivers: list[Receiver] = []
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        # One consumer per process: a restarted process is a new consumer, and what the old
        # one held is claimed again after its backoff like any pending entry.
        consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=sum(h.max_concurrency for h in self._hooks)),
            headers={"User-Agent": USER_AGENT},
            trust_env=True,
        )
        for hook in self._hooks:
            receiver = Receiver(
                hook, self._stream, self._session, self._metrics, consumer, self._clock
            )
            self._receivers.append(receiver)
            self._tasks.append(asyncio.create_task(receiver.run(self._stopping)))
        log.info("webhooks.started", receivers=[h.label for h in self._hooks], consumer=consumer)

    async def stop(self, budget: float) -> None:
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await asyncio.gather(*(r.drain(budget) for r in self._receivers))
        if self._session is not None:
            await self._session.close()
