"""A client library for the broker: typed tokens, an in-process cache, auth helpers.

    from broker.client import BrokerClient, aiohttp_middleware

    async with BrokerClient("http://broker:8080", api_key) as client:
        token = await client.token("alfresco", "u-1", min_ttl=60)
        async with aiohttp.ClientSession(
            middlewares=(aiohttp_middleware(client, "alfresco", "u-1"),)
        ) as api:
            ...

It imports aiohttp and the standard library only, none of the broker server's modules;
``HttpxAuth`` imports httpx when first used (the ``broker[httpx]`` extra). See docs/client.md.
"""

# Modules, imports pointing one way: errors, token, retry <- client <- aiohttp_auth, httpx_auth.
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.client.aiohttp_auth import aiohttp_middleware
from broker.client.client import DEFAULT_MIN_TTL, BrokerClient
from broker.client.errors import (
    AppTokenNotConfigured,
    BrokerError,
    BrokerUnreachable,
    Forbidden,
    GrantNotFound,
    GrantUnreadable,
    InvalidRefreshToken,
    InvalidRequest,
    PayloadTooLarge,
    ProviderNotFound,
    RateLimited,
    ReauthRequired,
    StoreUnavailable,
    TryLater,
    Unauthenticated,
    UnexpectedAnswer,
    UpstreamUnavailable,
)
from broker.client.retry import RetryPolicy
from broker.client.token import Token

if TYPE_CHECKING:
    from broker.client.httpx_auth import HttpxAuth

__all__ = [
    "DEFAULT_MIN_TTL",
    "AppTokenNotConfigured",
    "BrokerClient",
    "BrokerError",
    "BrokerUnreachable",
    "Forbidden",
    "GrantNotFound",
    "GrantUnreadable",
    "HttpxAuth",
    "InvalidRefreshToken",
    "InvalidRequest",
    "PayloadTooLarge",
    "ProviderNotFound",
    "RateLimited",
    "ReauthRequired",
    "RetryPolicy",
    "StoreUnavailable",
    "Token",
    "TryLater",
    "Unauthenticated",
    "UnexpectedAnswer",
    "UpstreamUnavailable",
    "aiohttp_middleware",
]


def __getattr__(name: str) -> Any:
    """``HttpxAuth`` on first use, so importing broker.client never needs httpx."""
    if name == "HttpxAuth":
        from broker.client.httpx_auth import HttpxAuth

        return HttpxAuth
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
