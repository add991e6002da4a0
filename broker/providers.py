"""The configured providers, by name, and each one's circuit breaker: one lookup, with one
error (``provider_not_found``), for the HTTP layer and every service."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from broker.circuit import CircuitBreaker
from broker.config import ProviderSettings
from broker.errors import ProviderNotFound


class ProviderRegistry:
    def __init__(
        self,
        providers: Mapping[str, ProviderSettings],
        *,
        circuit_failures: int = 5,
        circuit_open_for: float = 5.0,
    ) -> None:
        self._providers = dict(providers)
        self._breakers = {
            name: CircuitBreaker(circuit_failures, circuit_open_for) for name in providers
        }

    def get(self, name: str) -> ProviderSettings:
        try:
            return self._providers[name]
        except KeyError:
            raise ProviderNotFound(f"no provider named {name!r} is configured") from None

    def breaker(self, name: str) -> CircuitBreaker:
        """Per replica: each replica protects the provider from itself."""
        self.get(name)
        return self._breakers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._providers)
