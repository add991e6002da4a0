"""The rules between settings (which combinations are refused), apart from the fields they read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol
from urllib.parse import urlsplit

from broker.settings_providers import ClientSettings, ProviderSettings, check_clients
from broker.settings_types import CLUSTER_SCHEME, setting_error
from broker.settings_webhooks import WebhookSettings, check_webhooks


class Combined(Protocol):
    """The settings the rules read (:class:`broker.settings_model.Settings`)."""

    @property
    def redis_url(self) -> str: ...
    @property
    def workers(self) -> int: ...
    @property
    def default_min_ttl(self) -> int: ...
    @property
    def max_min_ttl(self) -> int: ...
    @property
    def provider_timeout(self) -> float: ...
    @property
    def redis_timeout(self) -> float: ...
    @property
    def min_replicas_to_ack(self) -> int: ...
    @property
    def replica_ack_timeout(self) -> float: ...
    @property
    def rotated_write_window(self) -> float: ...
    @property
    def lock_ttl(self) -> float: ...
    @property
    def retry_base(self) -> float: ...
    @property
    def retry_max(self) -> float: ...
    @property
    def providers(self) -> Mapping[str, ProviderSettings]: ...
    @property
    def clients(self) -> Sequence[ClientSettings]: ...
    @property
    def webhooks(self) -> Sequence[WebhookSettings]: ...
    @property
    def is_memory_store(self) -> bool: ...


def check_together(settings: Combined) -> None:
    """Each rule in turn; the first broken one raises ``setting_error``."""
    _safe_together(settings)
    _workers_share_a_store(settings)
    check_clients(settings.clients, settings.providers)
    check_webhooks(settings.webhooks, list(settings.providers))


def _safe_together(settings: Combined) -> None:
    """Settings that are only safe together (docs/operations.md, "Locks and timeouts")."""
    if settings.default_min_ttl > settings.max_min_ttl:
        raise setting_error("default_min_ttl", "must be 0..max_min_ttl")
    if settings.retry_base > settings.retry_max:
        raise setting_error("retry_base", "must be in (0, retry_max]")
    held = settings.provider_timeout + settings.rotated_write_window + settings.redis_timeout
    if settings.lock_ttl < held:
        raise setting_error(
            "lock_ttl",
            f"must be at least provider_timeout + rotated_write_window + redis_timeout "
            f"(= {held:g}): a refresh holds its lock through the provider call and the write "
            "of its result, or another replica could present the same refresh token",
        )
    if settings.min_replicas_to_ack and settings.replica_ack_timeout >= settings.redis_timeout:
        raise setting_error(
            "replica_ack_timeout",
            f"must be shorter than redis_timeout ({settings.redis_timeout:g}): WAIT blocks its "
            "connection that long, and the command would time out first",
        )
    if settings.min_replicas_to_ack and urlsplit(settings.redis_url).scheme == CLUSTER_SCHEME:
        raise setting_error(
            "min_replicas_to_ack",
            "is not supported with redis+cluster (WAIT would have to run on each grant's "
            "node); use 0, or a Sentinel-managed Redis",
        )


def _workers_share_a_store(settings: Combined) -> None:
    if settings.workers > 1 and settings.is_memory_store:
        raise setting_error(
            "workers",
            "must be 1 with the embedded memory:// store (each worker process would hold a "
            "store of its own); set redis_url to a Redis server",
        )
