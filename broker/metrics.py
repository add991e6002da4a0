"""Prometheus metrics, one registry per app so several apps can share a process (tests).

Labels never carry user ids or anything secret: cardinality stays bounded by the number of
providers, clients and routes.

Under ``broker serve --workers N`` (``broker.workers``) every worker writes its values to files
in ``PROMETHEUS_MULTIPROC_DIR`` and a scrape of any worker adds all of them up
(prometheus-client's multiprocess mode). Each gauge therefore says how the workers' values
combine: ``livesum`` for what each process counts itself, ``livemostrecent`` for figures every
worker reads from Redis (the same store-wide value), ``livemax`` for per-process states where
the worst one matters.
"""

from __future__ import annotations

import os
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from broker import __version__

M = TypeVar("M", bound=MetricWrapperBase)
MAX_BOUND_CHILDREN = 4096

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable


class Metrics:
    """Every metric the broker exports."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        r = self.registry = CollectorRegistry()
        self._multiprocess_dir = os.environ.get(MULTIPROCESS_DIR)
        self.http_requests = Counter(
            "broker_http_requests",
            "HTTP requests served.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "broker_http_request_duration_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge(
            "broker_http_requests_in_flight",
            "HTTP requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.token_handouts = Counter(
            "broker_token_handouts",
            "Access tokens handed to clients.",
            ["provider", "client"],
            registry=r,
        )
        self.app_token_handouts = Counter(
            "broker_app_token_handouts",
            "App tokens (client-credentials grant) handed to clients.",
            ["provider", "client"],
            registry=r,
        )
        self.app_token_requests = Counter(
            "broker_app_token_requests",
            "App token requests to providers by outcome (success, transient, rejected; "
            "circuit_open: no call made) and trigger (on_demand, scheduled).",
            ["provider", "outcome", "trigger"],
            registry=r,
        )
        self.refreshes = Counter(
            "broker_refreshes",
            "Refreshes by outcome (success, rejected, transient; circuit_open: no call made).",
            ["provider", "outcome", "trigger"],
            registry=r,
        )
        self.refresh_duration = Histogram(
            "broker_refresh_duration_seconds",
            "Provider token endpoint latency.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "broker_redis_errors",
            "Failed Redis operations.",
            ["operation"],
            registry=r,
        )
        self.replication_unconfirmed = Counter(
            "broker_replication_unconfirmed",
            "Grant writes and locks that fewer than min_replicas_to_ack replicas confirmed in "
            "time.",
            registry=r,
        )
        self.grant_cache_lookups = Counter(
            "broker_grant_cache_lookups",
            "Token requests answered from this process's grant cache (hit) or Redis (miss).",
            ["result"],
            registry=r,
        )
        self.grant_cache_resets = Counter(
            "broker_grant_cache_resets",
            "Times the grant cache was emptied because its change subscription was made or lost.",
            registry=r,
        )
        self.grants_unreadable = Counter(
            "broker_grants_unreadable",
            "Stored grants that failed decryption or authentication (security event).",
            ["provider"],
            registry=r,
        )
        self.records_by_key = Gauge(
            "broker_records_by_key",
            "Encrypted records (grants, pending authorizations, app tokens) per encryption key "
            "id, from the latest complete census; key ids not configured count as (unknown).",
            ["key_id"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.revocations = Counter(
            "broker_revocations",
            "Revocations at providers by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.authorizations = Counter(
            "broker_authorizations",
            "Authorization-code flows by outcome (started, connected, denied, error, "
            "invalid_state).",
            ["provider", "outcome"],
            registry=r,
        )
        self.lost_writes = Counter(
            "broker_refresh_write_conflicts",
            "Refresh results not written because a newer record was already stored.",
            ["provider"],
            registry=r,
        )
        self.rotated_writes_lost = Counter(
            "broker_rotated_writes_lost",
            "Tokens a provider issued that could not be stored within rotated_write_window "
            "(Redis unreachable): that grant probably needs re-authorization.",
            ["provider"],
            registry=r,
        )
        self.index_repairs = Counter(
            "broker_index_repairs",
            "Index entries the reconciler repaired (a grant missing from the schedule, a "
            "state set or the refresh-token expiry index after a lost index update).",
            ["provider", "index"],
            registry=r,
        )
        self.schedule_lag = Gauge(
            "broker_schedule_lag_seconds",
            "Age of the oldest due refresh not yet claimed (0 when none is late).",
            ["provider"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.grants_due_next_minute = Gauge(
            "broker_grants_due_next_minute",
            "Grants whose refresh is due within 60 s.",
            ["provider"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.grants = Gauge(
            "broker_grants",
            "Grants by state.",
            ["provider", "state"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.refresh_token_expiring = Gauge(
            "broker_refresh_tokens_expiring",
            "Grants whose refresh token reaches the provider's maximum age within "
            "refresh_token_warn_before.",
            ["provider"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.circuit_state = Gauge(
            "broker_provider_circuit_state",
            "Circuit breaker per provider: 0 closed, 1 half-open (probing), 2 open.",
            ["provider"],
            registry=r,
            multiprocess_mode="livemax",  # each worker has its own breaker: the worst one
        )
        self.rate_limited = Counter(
            "broker_rate_limited",
            "Requests refused with 429 because the client was over its rate_limit.",
            ["client"],
            registry=r,
        )
        self.rate_limiter_failures = Counter(
            "broker_rate_limiter_failures",
            "Rate-limit checks that failed or timed out (the request was let through).",
            registry=r,
        )
        self.config_reloads = Counter(
            "broker_config_reloads",
            "Configuration reloads (SIGHUP) by outcome (applied, unchanged, refused).",
            ["outcome"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "broker_webhook_deliveries",
            "Webhook delivery attempts by outcome (success; refused: a non-2xx answer; error: "
            "no answer in time; expired: given up after 24 hours).",
            ["webhook", "outcome"],
            registry=r,
        )
        self.webhook_oldest_undelivered = Gauge(
            "broker_webhook_oldest_undelivered_seconds",
            "Age of the oldest event not yet delivered to a webhook (0 when none waits).",
            ["webhook"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.webhook_pending = Gauge(
            "broker_webhook_pending",
            "Events read for a webhook and not yet delivered (being retried).",
            ["webhook"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        Gauge(
            "broker_build_info",
            "Build information.",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        ).labels(__version__).set(1)

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, looked up once per label values: on the request path
        ``labels()`` costs more than the count itself. Bounded; past the bound, unremembered."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*labels)
            if len(self._children) < MAX_BOUND_CHILDREN:
                self._children[key] = found
        return found  # type: ignore[return-value]  # the child of an M is an M

    def render(self) -> bytes:
        """This app's metrics, or under ``--workers`` those of every worker added up."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
