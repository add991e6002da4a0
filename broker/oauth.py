"""Talking to providers' token, revocation and metadata endpoints (RFC 6749, 7009, 8414).

Every answer is classified: tokens (:class:`TokenSet`), a final rejection
(:class:`ProviderRejected`: the refresh token is dead) or a transient failure
(:class:`ProviderUnavailable`: timeouts, connection errors, 5xx, 429, garbage). Nothing here
puts a response body, token or secret into an exception: only status codes and the provider's
``error`` code, which is checked to be a short identifier first.

Discovery (OpenID Connect Discovery 1.0 / RFC 8414) runs once at start-up: it fills the
endpoints a provider's configuration leaves out, and a failure stops start-up naming the
provider, since serving with half-known endpoints would fail later and less clearly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, quote_plus, urlencode

import aiohttp
import structlog
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from broker.config import ProviderSettings, provider_url
from broker.errors import ConfigError, ProviderError, ProviderRejected, ProviderUnavailable
from broker.models import MAX_SCOPE_CHARS, MAX_TOKEN_CHARS, TokenSet
from broker.tls import transport_failure

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_RETRY_AFTER = 3600
MAX_EXPIRES_IN = 10 * 366 * 86400
ERROR_CODE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Error codes an answer may put into logs, API answers and a grant's last_error: OAuth's own
# (RFC 6749 §5.2, RFC 6750 §3.1, RFC 7009 §2.2.1, RFC 8628 §3.5, RFC 9449) and a provider's
# configured reauth_errors. Any other is shown as unrecognized_error: a provider's `error` could
# be anything it echoes, even the token it was sent.
OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        "invalid_token",
        "insufficient_scope",
        "unsupported_token_type",
        "slow_down",
        "expired_token",
        "invalid_dpop_proof",
        "use_dpop_nonce",
        "invalid_target",
        "consent_required",
        "login_required",
        "interaction_required",
    }
)
RevocationOutcome = Literal["revoked", "failed", "not_supported"]
# our setting -> the metadata field that fills it when the configuration leaves it out
DISCOVERED_ENDPOINTS = {
    "token_url": "token_endpoint",
    "authorize_url": "authorization_endpoint",
    "revocation_url": "revocation_endpoint",
}

log = structlog.get_logger(__name__)


class OAuthClient:
    """One per app: shares the app's HTTP session and its timeouts."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        connect_timeout: float,
        max_response_bytes: int,
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._max_bytes = max_response_bytes
        self._proxies: dict[str, dict[str, Any]] = {}

    async def _proxy(self, url: str) -> dict[str, Any]:
        """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``NO_PROXY``...), as
        aiohttp's ``trust_env`` finds it, looked up once per URL: the session's own lookup
        (``trust_env=True``) runs in a thread on every request, which cost about 40 % of the
        CPU of a refresh (docs/performance.md). The environment does not change at run time."""
        via = self._proxies.get(url)
        if via is None:
            try:
                proxy, auth = await asyncio.to_thread(get_env_proxy_for_url, URL(url))
                via = {"proxy": proxy, "proxy_auth": auth}
            except LookupError:  # none set, or NO_PROXY names this host
                via = {}
            self._proxies[url] = via
        return via

    async def refresh(self, provider: ProviderSettings, refresh_token: str) -> TokenSet:
        """New tokens for ``refresh_token`` (RFC 6749 §6)."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_request(provider, form)

    async def client_credentials(self, provider: ProviderSettings, scope: str) -> TokenSet:
        """An access token for the provider's own client (RFC 6749 §4.4); ``scope`` "" asks
        for the provider's default."""
        form = {"grant_type": "client_credentials"}
        if scope:
            form["scope"] = scope
        return await self._token_request(provider, form)

    async def exchange_code(
        self, provider: ProviderSettings, code: str, redirect_uri: str, code_verifier: str | None
    ) -> TokenSet:
        """Tokens for an authorization code (RFC 6749 §4.1.3, RFC 7636)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        return await self._token_request(provider, form)

    async def revoke(
        self,
        provider: ProviderSettings,
        token: str,
        hint: Literal["refresh_token", "access_token"] = "refresh_token",
    ) -> RevocationOutcome:
        """Best-effort RFC 7009 revocation of a refresh token (or of the access token of a
        grant that holds no refresh token)."""
        if provider.revocation_url is None:
            return "not_supported"
        form = {"token": token, "token_type_hint": hint}
        try:
            status, _, _ = await self._post(provider, provider.revocation_url, form)
        except ProviderUnavailable:
            return "failed"
        return "revoked" if status == 200 else "failed"

    async def metadata(self, url: str) -> dict[str, Any]:
        """A provider's metadata document (a JSON object); ProviderUnavailable otherwise."""
        try:
            async with self._session.get(
                url,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,
                **await self._proxy(url),
            ) as response:
                body = await _read_bounded(response, self._max_bytes)
                status = response.status
        except TimeoutError as err:
            raise ProviderUnavailable("timeout", "no answer in time") from err
        except aiohttp.ClientError as err:
            raise transport_failure(err) from err
        if status != 200:
            raise ProviderUnavailable(f"http_{status}", "the metadata document was not served")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise ProviderUnavailable("malformed_response", "the metadata is not a JSON object")
        return document

    async def discover(self, provider: ProviderSettings) -> ProviderSettings:
        """``provider`` with the endpoints its configuration leaves out taken from its metadata
        document (configured ones win); ConfigError naming the provider if that fails."""
        url = provider.metadata_url
        if url is None:
            return provider
        where = f"providers.{provider.name}." + (
            "discovery_url" if provider.discovery_url is not None else "issuer"
        )
        try:
            document = await self.metadata(url)
        except ProviderError as err:
            raise ConfigError(where, f"discovery at {url} failed ({err.reason})") from err
        if provider.issuer is not None and str(document.get("issuer", "")).rstrip(
            "/"
        ) != provider.issuer.rstrip("/"):
            raise ConfigError(
                where, f"the metadata at {url} names another issuer: {document.get('issuer')!r}"
            )
        found: dict[str, str] = {}
        for setting, field in DISCOVERED_ENDPOINTS.items():
            value = document.get(field)
            if not getattr(provider, setting) and value is not None:
                found[setting] = provider_url(
                    f"{where} ({field} at {url})", value, provider.allow_insecure_http
                )
        # A new model, validated (model_copy would not): discovered endpoints get the checks
        # of configured ones.
        resolved = ProviderSettings.model_validate({**dict(provider), **found})
        if not resolved.token_url:
            raise ConfigError(where, f"the metadata at {url} has no token_endpoint")
        methods = document.get("token_endpoint_auth_methods_supported")
        if (
            provider.client_secret is not None
            and isinstance(methods, list)
            and provider.client_auth not in methods
        ):
            log.warning(
                "provider.client_auth_not_advertised",
                provider=provider.name,
                client_auth=provider.client_auth,
                advertised=[m for m in methods if isinstance(m, str)][:10],
            )
        log.info("provider.discovered", provider=provider.name, endpoints=sorted(found))
        return resolved

    async def _token_request(self, provider: ProviderSettings, form: dict[str, str]) -> TokenSet:
        status, headers, body = await self._post(provider, provider.token_url, form)
        fields = _parse_fields(headers.get("Content-Type", ""), body)
        if 200 <= status < 300:
            if fields is None:
                raise ProviderUnavailable("malformed_response", f"HTTP {status}, unparseable body")
            return _token_set(fields, provider.default_expires_in)
        retry_after = _retry_after(headers.get("Retry-After"))
        error = fields.get("error") if fields else None
        if isinstance(error, str) and status in (400, 401, 403):
            known = error in OAUTH_ERRORS or error in provider.reauth_errors
            code = error if known and ERROR_CODE.match(error) else "unrecognized_error"
            if code in provider.reauth_errors:
                raise ProviderRejected(code, f"HTTP {status}")
            raise ProviderUnavailable(code, f"HTTP {status}", retry_after=retry_after)
        reason = "rate_limited" if status == 429 else f"http_{status}"
        raise ProviderUnavailable(reason, f"HTTP {status}", retry_after=retry_after)

    async def _post(
        self, provider: ProviderSettings, url: str, form: dict[str, str]
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = {"Accept": "application/json", "Content-Type": FORM_CONTENT_TYPE}
        form = dict(form)
        secret = provider.client_secret.reveal() if provider.client_secret else None
        if secret is not None and provider.client_auth == "client_secret_basic":
            # RFC 6749 §2.3.1: each part is form-urlencoded before base64.
            pair = f"{quote_plus(provider.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = provider.client_id
            if secret is not None:
                form["client_secret"] = secret
        try:
            async with self._session.post(
                # Encoded here: a dict makes aiohttp build a FormData, a multipart writer and a
                # uuid4 boundary on every call, then send the very same urlencoded body.
                url,
                data=urlencode(form).encode(),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                **await self._proxy(url),
            ) as response:
                body = await _read_bounded(response, self._max_bytes)
                return response.status, response.headers, body
        except TimeoutError as err:
            raise ProviderUnavailable("timeout", "no answer in time") from err
        except aiohttp.ClientError as err:
            raise transport_failure(err) from err


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, read chunk by chunk; ProviderUnavailable as soon as it exceeds ``limit``
    bytes (a declared Content-Length over it is refused before reading anything)."""
    if response.content_length is not None and response.content_length > limit:
        raise _too_large(response)
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > limit:
            raise _too_large(response)
    return bytes(body)


def _too_large(response: aiohttp.ClientResponse) -> ProviderUnavailable:
    return ProviderUnavailable("response_too_large", f"HTTP {response.status}")


async def discover_all(
    oauth: OAuthClient, providers: Mapping[str, ProviderSettings]
) -> dict[str, ProviderSettings]:
    """Every provider, those with ``issuer`` or ``discovery_url`` resolved (concurrently)."""
    names = [name for name, p in providers.items() if p.discovers]
    results = await asyncio.gather(
        *(oauth.discover(providers[name]) for name in names), return_exceptions=True
    )
    resolved = dict(providers)
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException):
            raise result  # the first failing provider, in configuration order
        resolved[name] = result
    return resolved


def _parse_fields(content_type: str, body: bytes) -> dict[str, Any] | None:
    """A token endpoint answer as a dict, from JSON or form encoding; None if it is neither."""
    text = body.decode("utf-8", errors="replace").strip()
    if "json" in content_type or text.startswith("{"):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested arrays
            return None
        return value if isinstance(value, dict) else None
    if "x-www-form-urlencoded" in content_type or ("=" in text and "<" not in text):
        pairs = parse_qsl(text, keep_blank_values=True)
        return dict(pairs) if pairs else None
    return None


def _token_set(fields: Mapping[str, Any], default_expires_in: int) -> TokenSet:
    refresh = fields.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or len(refresh) > MAX_TOKEN_CHARS):
        raise ProviderUnavailable("malformed_response", "unusable refresh_token")
    # A usable new refresh token in an otherwise unusable answer travels with the error: the
    # provider may have rotated, and the one presented may be dead now.
    rotated = refresh or None
    access = fields.get("access_token")
    if not isinstance(access, str) or not access or len(access) > MAX_TOKEN_CHARS:
        raise ProviderUnavailable(
            "malformed_response", "no usable access_token", rotated_refresh_token=rotated
        )
    token_type = fields.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not 0 < len(token_type) <= 64:
        raise ProviderUnavailable(
            "malformed_response", "unusable token_type", rotated_refresh_token=rotated
        )
    expires_in = _expires_in(fields.get("expires_in"))
    return TokenSet(
        access_token=access,
        token_type="Bearer" if token_type.lower() == "bearer" else token_type,
        expires_in=default_expires_in if expires_in is None else expires_in,
        refresh_token=refresh or None,
        scope=_scope(fields.get("scope")),
        expires_stated=expires_in is not None,
    )


def _scope(value: Any) -> str | None:
    """The granted scope; a list of strings (a common deviation) is joined, anything else
    unusable is dropped (the scope is informative: no reason to lose the tokens over it)."""
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = " ".join(value)
    if not isinstance(value, str) or len(value) > MAX_SCOPE_CHARS:
        return None
    return value


def _expires_in(value: Any) -> int | None:
    """Seconds, at least 1 and at most ``MAX_EXPIRES_IN``, or None when not stated.
    Form-encoded answers give strings and some providers omit it (Cloud 66, GitHub OAuth
    apps); a value that is not a positive finite number (a bool, an object, zero or negative,
    NaN) counts as not stated. The answer is never refused over it: it may carry a rotated
    refresh token, which must not be lost."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond a float's range
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(max(int(seconds), 1), MAX_EXPIRES_IN)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
