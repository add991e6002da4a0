"""The app factory: wiring, app keys and the lifecycles of Redis and the HTTP client session.

Cleanup contexts exit in reverse order: the HTTP context (which drains refreshes in flight so a
rotated token reaches Redis) exits before the Redis context closes the pool. Shutdown has one
budget, ``shutdown_timeout`` from SIGTERM: handlers, then the scheduler, then refreshes in flight
share it (the Helm chart's grace period is sized from it). Providers configured
with ``issuer`` or ``discovery_url`` are resolved in the HTTP context, once, before any service
is built; ``app[SETTINGS]`` then holds the resolved endpoints.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import structlog
from aiohttp import web

from broker import api
from broker.app_schedule import AppTokenScheduler
from broker.app_store import AppTokenStore
from broker.apptoken_request import AppTokenRequests
from broker.apptokens import AppTokenService
from broker.auth import Authenticator
from broker.authorize import AuthorizationService
from broker.cached_reads import CachedReads
from broker.census import KeyCensus
from broker.config import Settings
from broker.crypto import KeyRing
from broker.grant_cache import GrantCache, GrantChanges
from broker.grant_codec import GrantCodec
from broker.grants import GrantService
from broker.key_roster import KeyRoster
from broker.keys import Keys
from broker.locks import GrantLocks, LockStore
from broker.metrics import Metrics
from broker.middlewares import RATE_LIMITER, make_middlewares
from broker.oauth import OAuthClient, discover_all
from broker.pending import PendingAuthorizations
from broker.policy import RefreshPolicy
from broker.providers import ProviderRegistry
from broker.ratelimit import RateLimiter
from broker.redis_client import Guard, close, connect
from broker.refresh import Refresher
from broker.refresh_locked import LockedRefresh
from broker.reload import Reloader
from broker.schedule import ScheduleIndex
from broker.scheduler import Scheduler, SchedulerPolicy
from broker.store import GrantStore, WriteOptions
from broker.tls import client_context
from broker.webhooks.delivery import WebhookService
from broker.webhooks.expiring import ExpiryWatch
from broker.webhooks.stream import EventStream

log = structlog.get_logger("broker")

HTTP_POOL_LIMIT = 100
USER_AGENT = "broker (OAuth2 token broker)"


class Clock(Protocol):
    def __call__(self) -> float: ...


CLOCK = web.AppKey("clock", Clock)


@dataclass
class DrainBudget:
    """When shutdown must be done by (monotonic), set as it begins."""

    deadline: float | None = None


DRAIN = web.AppKey("drain", DrainBudget)
PENDING = web.AppKey("pending", PendingAuthorizations)
GRANT_CHANGES = web.AppKey("grant_changes", GrantChanges)
READS = web.AppKey("reads", CachedReads)


def create_app(
    settings: Settings,
    *,
    clock: Clock = time.time,
    reload_on_sighup: bool = False,
    config_path: str | os.PathLike[str] | None = None,
) -> web.Application:
    """A ready-to-run broker app; Redis and the HTTP session open when it starts. ``clock``
    (unix seconds) lets tests move time instead of waiting for tokens to expire. With
    ``reload_on_sighup``, ``SIGHUP`` reloads the clients from ``config_path`` (the file
    ``settings`` came from, if any) and the environment."""
    metrics = Metrics()
    authenticator = Authenticator(settings.clients)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=make_middlewares(metrics, authenticator, settings.max_body_bytes),
    )
    app[api.SETTINGS] = settings
    app[api.METRICS] = metrics
    app[api.KEYRING] = KeyRing(settings.encryption_keys)
    app[api.STOPPING] = asyncio.Event()
    app[CLOCK] = clock
    app[DRAIN] = DrainBudget()
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(_app_scheduler)
    app.cleanup_ctx.append(_webhooks)
    app.cleanup_ctx.append(_census)
    app.cleanup_ctx.append(_key_roster)
    app.cleanup_ctx.append(_scheduler)  # registered last: stops first
    if reload_on_sighup:
        app.cleanup_ctx.append(
            _reload_on_sighup(Reloader(config_path, settings, authenticator, metrics))
        )
    app.on_startup.append(_listen_for_grant_changes)
    app.on_shutdown.append(_stop_accepting)
    api.add_routes(app)
    return app


async def _listen_for_grant_changes(app: web.Application) -> None:
    """Not started with the Redis client: aiohttp's run_app waits for every task left after a
    failed start-up, and a listener cancelled mid-connect may not end on Python 3.11."""
    changes = app.get(GRANT_CHANGES)
    if changes is not None:
        changes.start()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[api.SETTINGS]
    redis = connect(settings)
    keys = Keys(settings.key_prefix, settings.schedule_shards)
    guard = Guard(app[api.METRICS], settings.store_retry_after)
    schedule = ScheduleIndex(redis, keys, guard, app[api.METRICS], settings.schedule_shards)
    cache = GrantCache(settings.token_cache_seconds, settings.token_cache_entries)
    app[api.STORE] = GrantStore(
        redis,
        GrantCodec(app[api.KEYRING], app[api.METRICS], settings.record_format),
        keys,
        guard,
        schedule,
        cache=cache,
        options=WriteOptions(
            min_replicas=settings.min_replicas_to_ack,
            ack_timeout=settings.replica_ack_timeout,
            events_max_len=settings.events_max_len,
        ),
    )
    app[READS] = CachedReads(app[api.STORE], app[api.METRICS])
    app[PENDING] = PendingAuthorizations(redis, keys, guard)
    app[RATE_LIMITER] = RateLimiter(
        redis, keys, app[api.METRICS], timeout=settings.rate_limit_timeout
    )
    if settings.is_memory_store:
        log.warning(
            "store.not_durable",
            detail="embedded memory:// store: grants are lost when the process stops",
        )
    if settings.ephemeral_encryption_key:
        log.warning(
            "encryption.ephemeral_key", detail="no BROKER_ENCRYPTION_KEYS: using a throwaway key"
        )
    changes = None
    if settings.is_memory_store:
        cache.only_local_writers()  # and fakeredis's pub/sub swallows a task's cancellation
    elif settings.token_cache_seconds > 0:
        changes = GrantChanges(redis, keys.changes_channel(), cache, app[api.METRICS])
        app[GRANT_CHANGES] = changes  # started once every part has started (on_startup)
    yield
    if changes is not None:
        await changes.stop()
    await app[READS].settle()
    await close(redis)  # behind Sentinel, the sentinels' connections too


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[api.SETTINGS]
    session = aiohttp.ClientSession(
        # Always verifying: there is no setting that turns certificate checks off.
        connector=aiohttp.TCPConnector(
            limit=HTTP_POOL_LIMIT, ssl=client_context(settings.ca_bundle)
        ),
        headers={"User-Agent": USER_AGENT},
        # The environment's proxy is applied by OAuthClient, looked up once per URL: with
        # trust_env aiohttp looks it (and ~/.netrc) up in a thread on every request.
        trust_env=False,
    )
    oauth = OAuthClient(
        session,
        timeout=settings.provider_timeout,
        connect_timeout=settings.provider_connect_timeout,
        max_response_bytes=settings.provider_max_response_bytes,
    )
    try:
        # Once, before anything uses a provider: endpoints from issuer / discovery_url.
        # No re-validation needed: the providers are validated, and their names (all that
        # Settings' own rules look at) unchanged.
        discovered = await discover_all(oauth, settings.providers)
        settings = settings.model_copy(update={"providers": discovered})
    except BaseException:
        await session.close()
        raise
    app[api.SETTINGS] = settings
    store = app[api.STORE]
    locks = GrantLocks(
        LockStore(
            store,
            min_replicas=settings.min_replicas_to_ack,
            ack_timeout=settings.replica_ack_timeout,
        ),
        ttl=settings.lock_ttl,
        wait_timeout=settings.lock_wait_timeout,
    )
    providers = ProviderRegistry(
        settings.providers,
        circuit_failures=settings.circuit_failures,
        circuit_open_for=settings.circuit_open_for,
    )
    app[api.PROVIDERS] = providers
    policy = RefreshPolicy.from_settings(settings)
    refresher = Refresher(
        store,
        LockedRefresh(store, locks, oauth, providers, app[api.METRICS], policy, app[CLOCK]),
        app[READS],
    )
    app[api.REFRESHER] = refresher
    app[api.GRANTS] = GrantService(
        store, providers, locks, oauth, refresher, app[api.METRICS], clock=app[CLOCK]
    )
    app[api.AUTHORIZATIONS] = AuthorizationService(
        store,
        app[PENDING],
        providers,
        locks,
        app[api.KEYRING],
        oauth,
        refresher,
        app[api.METRICS],
        settings,
        clock=app[CLOCK],
    )
    app[api.APP_TOKENS] = _app_tokens(app, settings, store, oauth, providers)
    yield
    # Whatever is left of the budget, but never less than one Redis round trip: a rotated
    # token in hand gets its write.
    await refresher.drain(max(_drain_left(app), settings.redis_timeout))
    await app[api.APP_TOKENS].drain(_drain_left(app))
    await session.close()


def _app_tokens(
    app: web.Application,
    settings: Settings,
    store: GrantStore,
    oauth: OAuthClient,
    providers: ProviderRegistry,
) -> AppTokenService:
    """App tokens: their own records and locks (``{prefix}:{app:...}``), the grants' policy."""
    locks = GrantLocks(
        LockStore(
            store,
            min_replicas=settings.min_replicas_to_ack,
            ack_timeout=settings.replica_ack_timeout,
            key=store.keys.app_lock_key,
        ),
        ttl=settings.lock_ttl,
        wait_timeout=settings.lock_wait_timeout,
    )
    app_store = AppTokenStore(
        store.redis, app[api.KEYRING], store.keys, store.guard, app[api.METRICS]
    )
    policy = RefreshPolicy.from_settings(settings)
    requests = AppTokenRequests(
        app_store, locks, oauth, providers, app[api.METRICS], policy, clock=app[CLOCK]
    )
    return AppTokenService(app_store, locks, requests, providers, clock=app[CLOCK])


async def _app_scheduler(app: web.Application) -> AsyncIterator[None]:
    """The app tokens' refresher, only where some provider enables them."""
    settings = app[api.SETTINGS]
    if not settings.scheduler_enabled or not any(
        p.client_credentials for p in settings.providers.values()
    ):
        yield
        return
    scheduler = AppTokenScheduler(
        app[api.APP_TOKENS],
        tick=settings.scheduler_tick,
        lease=settings.scheduler_lease,
        concurrency=settings.scheduler_concurrency,
        clock=app[CLOCK],
    )
    app[api.APP_SCHEDULER] = scheduler
    scheduler.start()
    yield
    await scheduler.stop(_drain_left(app))


async def _webhooks(app: web.Application) -> AsyncIterator[None]:
    """Deliveries to the ``[[webhooks]]`` receivers (docs/webhooks.md), from every replica.
    Events are recorded whether or not any is configured (in-cluster consumers read them)."""
    settings = app[api.SETTINGS]
    store = app[api.STORE]
    stopping = asyncio.Event()
    expiring = [name for name, p in settings.providers.items() if p.refresh_token_max_age]
    watch = ExpiryWatch(store, expiring, settings.refresh_token_warn_before, app[CLOCK])
    watching = asyncio.create_task(watch.run(stopping)) if expiring else None
    service = None
    if settings.webhooks:
        stream = EventStream(store.redis, store.keys, store.guard)
        service = WebhookService(settings.webhooks, stream, app[api.METRICS], clock=app[CLOCK])
        service.start()
    yield
    stopping.set()
    if watching is not None:
        await watching
    if service is not None:
        await service.stop(_drain_left(app))


async def _census(app: web.Application) -> AsyncIterator[None]:
    """The rolling count behind ``broker_records_by_key`` (see broker/census.py)."""
    interval = app[api.SETTINGS].key_census_interval
    if not interval:
        yield
        return
    store = app[api.STORE]
    census = KeyCensus(store.redis, store.keys, app[api.KEYRING], app[api.METRICS], store.guard)
    stop = asyncio.Event()
    task = asyncio.create_task(census.run(interval, stop), name="key-census")
    yield
    stop.set()
    await task


async def _key_roster(app: web.Application) -> AsyncIterator[None]:
    """This process's entry in the roster ``broker rekey`` checks (see broker/key_roster.py)."""
    if app[api.SETTINGS].is_memory_store:  # one process; nothing rekeys it from outside
        yield
        return
    store = app[api.STORE]
    roster = KeyRoster(store.redis, store.keys, store.guard, app[api.KEYRING].primary_id)
    stop = asyncio.Event()
    task = asyncio.create_task(roster.run(stop), name="key-roster")
    yield
    stop.set()
    await task


async def _scheduler(app: web.Application) -> AsyncIterator[None]:
    settings = app[api.SETTINGS]
    if not settings.scheduler_enabled:
        yield
        return
    scheduler = Scheduler(
        app[api.STORE],
        app[api.REFRESHER],
        app[api.PROVIDERS],
        app[api.METRICS],
        SchedulerPolicy.from_settings(settings),
        clock=app[CLOCK],
    )
    app[api.SCHEDULER] = scheduler
    scheduler.start()
    yield
    await scheduler.stop(_drain_left(app))


def _reload_on_sighup(
    reloader: Reloader,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def install(_: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)
        yield
        loop.remove_signal_handler(signal.SIGHUP)

    return install


def _drain_left(app: web.Application) -> float:
    deadline = app[DRAIN].deadline
    if deadline is None:
        return app[api.SETTINGS].shutdown_timeout
    return max(0.0, deadline - time.monotonic())


async def _stop_accepting(app: web.Application) -> None:
    app[DRAIN].deadline = time.monotonic() + app[api.SETTINGS].shutdown_timeout
    app[api.STOPPING].set()
    if api.SCHEDULER in app:
        app[api.SCHEDULER].stop_claiming()
    if api.APP_SCHEDULER in app:
        app[api.APP_SCHEDULER].stop_claiming()
    log.info("broker.stopping")
