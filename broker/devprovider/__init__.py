"""A fake OAuth2 authorization server: a real HTTP server for tests, demos and docker-compose.

It speaks authorization (code + PKCE S256), token (refresh_token and authorization_code grants),
revocation (RFC 7009), introspection (RFC 7662) and discovery, with either client authentication
method. It rotates refresh tokens and counts every rotated-out one presented again (for the broker
that is a bug); like a strict provider (RFC 9700 4.14.2) it then revokes the whole grant, its
live refresh token and access tokens included, since it cannot tell the client from a thief
(``revoke_on_reuse=False``, ``--forgive-reuse``: only count). It can be told to fail in every
way real providers do. It imports nothing from the broker, so the tests measure the broker
against an independent peer. It never logs a token.

    python -m broker.devprovider --port 9000 --access-token-ttl 30
    python -m broker.devprovider --form-encoded --no-refresh-tokens --no-expires-in --no-scope

(the second answers as Cloud 66 documents: ``access_token=...&token_type=bearer``, nothing else).
"""

# The modules, imports pointing one way: settings (switches, records) and wire (OAuth2 wire
# details) <- state (token tables, client authentication) <- tokens (/token) and endpoints
# (/authorize, /revoke, /introspect, discovery) <- provider (DevProvider: controls, serving)
# <- cli (``python -m broker.devprovider``).
from broker.devprovider.cli import main
from broker.devprovider.provider import DevProvider
from broker.devprovider.settings import (
    ClientAuth,
    DevProviderSettings,
    FailureKind,
    RevocationRecord,
)

__all__ = [
    "ClientAuth",
    "DevProvider",
    "DevProviderSettings",
    "FailureKind",
    "RevocationRecord",
    "main",
]
