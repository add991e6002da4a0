"""OAuth2 wire details the endpoints share: error answers, forms, Basic credentials, PKCE."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from urllib.parse import unquote_plus

from aiohttp import web

_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 4.1


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code}, status=status, headers=headers)


def _gone(request: web.Request) -> bool:
    """Whether the caller hung up (servers without handler cancellation get here)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _basic_credentials(value: str) -> tuple[str, str] | None:
    """(client_id, secret) from a Basic credential; each part is form-urlencoded (RFC 6749
    2.3.1) before base64, so a secret may hold a colon."""
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except ValueError:  # bad base64 or UTF-8
        return None
    user, colon, password = decoded.partition(":")
    return (unquote_plus(user), unquote_plus(password)) if colon else None


def _pkce_ok(challenge: str | None, verifier: str | None) -> bool:
    if challenge is None:
        return verifier is None  # a verifier without a challenge is a confused client
    if verifier is None or not _VERIFIER.fullmatch(verifier):
        return False
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return secrets.compare_digest(expected, challenge)


async def _form(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
