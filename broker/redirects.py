"""Where the authorization flow may send a user's browser when it ends.

An allow-list entry fixes a scheme, a host, a port and a path prefix. A ``redirect_after``
matches when its scheme, host (case-insensitive) and effective port are the same and its path is
the entry's path or lies below it: ``https://app.example/done`` allows ``/done`` and ``/done/x``
but not ``/donezo``; ``https://app.example/`` allows any path on that origin.

Anything a browser or a server could read differently from this module is refused rather than
interpreted: user info (``https://app.example@evil.example``), backslashes, whitespace and
control characters, non-ASCII, percent signs in the host, an empty path segment (``//``), and
dot segments or slashes hidden by percent-encoding (``/a/%2e%2e/``, ``%2f``, double encoding).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from broker.config import MAX_REDIRECT_URL_CHARS
from broker.errors import InvalidRequest

DEFAULT_PORTS = {"http": 80, "https": 443}
PLAIN_URL = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no space
RESERVED_PARAMS = frozenset({"status", "code", "provider"})  # what broker adds on the way back
MAX_DECODE_ROUNDS = 3


def check_redirect(url: str, allowlist: Sequence[str]) -> str:
    """``url`` if it is a safe absolute URL matching an allow-list entry; InvalidRequest
    naming the problem otherwise."""
    if len(url) > MAX_REDIRECT_URL_CHARS:
        raise InvalidRequest(f"redirect_after is longer than {MAX_REDIRECT_URL_CHARS} characters")
    if not PLAIN_URL.fullmatch(url) or "\\" in url:
        raise InvalidRequest(
            "redirect_after must be printable ASCII without spaces or backslashes "
            "(percent-encode the rest)"
        )
    origin = _origin(url)
    if origin is None:
        raise InvalidRequest("redirect_after must be an absolute http(s) URL without user info")
    path = urlsplit(url).path or "/"
    if not _clean_path(path):
        raise InvalidRequest("redirect_after has an empty, dot or encoded-slash path segment")
    if not any(_allows(entry, origin, path) for entry in allowlist):
        raise InvalidRequest("redirect_after is not in the redirect allow-list")
    return url


def with_params(url: str, params: Iterable[tuple[str, str]]) -> str:
    """``url`` with ``params`` added to its query; earlier values of those names are dropped
    so that the outcome broker reports cannot be pre-set by whoever chose the URL."""
    parts = urlsplit(url)
    kept = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in RESERVED_PARAMS
    ]
    return urlunsplit(parts._replace(query=urlencode([*kept, *params])))


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, lower-case host, effective port), or None for a URL we will not interpret."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return None
    if "@" in parts.netloc or "%" in parts.netloc or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def _clean_path(path: str) -> bool:
    if not path.startswith("/"):
        return False
    for segment in path.split("/")[1:-1]:
        if not segment:
            return False  # "//": some servers and proxies collapse or misroute it
    for segment in path.split("/")[1:]:
        decoded = segment
        for _ in range(MAX_DECODE_ROUNDS):
            decoded = unquote(decoded)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            return False
    return True


def _allows(entry: str, origin: tuple[str, str, int], path: str) -> bool:
    if _origin(entry) != origin:
        return False
    prefix = urlsplit(entry).path or "/"
    if path == prefix:
        return True
    return path.startswith(prefix if prefix.endswith("/") else prefix + "/")
