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
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, quote_plus

import aiohttp
import structlog

from broker.config import ProviderSettings, provider_url
from broker.errors import ConfigError, ProviderError, ProviderRejected, ProviderUnavailable
from broker.models import MAX_SCOPE_CHARS, MAX_TOKEN_CHARS, TokenSet

MAX_RETRY_AFTER = 3600
MAX_EXPIRES_IN = 10 * 366 * 86400
ERROR_CODE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
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

    async def refresh(self, provider: ProviderSettings, refresh_token: str) -> TokenSet:
        """New tokens for ``refresh_token`` (RFC 6749 §6)."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
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
            ) as response:
                body = await response.content.read(self._max_bytes + 1)
                status = response.status
        except TimeoutError as err:
            raise ProviderUnavailable("timeout", "no answer in time") from err
        except aiohttp.ClientError as err:
            raise ProviderUnavailable("connection_error", type(err).__name__) from err
        if len(body) > self._max_bytes:
            raise ProviderUnavailable("response_too_large", f"HTTP {status}")
        if status != 200:
            raise ProviderUnavailable(f"http_{status}", "the metadata document was not served")
        try:
            document = json.loads(body)
        except ValueError:
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
            code = error if ERROR_CODE.match(error) else "unrecognized_error"
            if code in provider.reauth_errors:
                raise ProviderRejected(code, f"HTTP {status}")
            raise ProviderUnavailable(code, f"HTTP {status}", retry_after=retry_after)
        reason = "rate_limited" if status == 429 else f"http_{status}"
        raise ProviderUnavailable(reason, f"HTTP {status}", retry_after=retry_after)

    async def _post(
        self, provider: ProviderSettings, url: str, form: dict[str, str]
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = {"Accept": "application/json"}
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
                url, data=form, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                body = await response.content.read(self._max_bytes + 1)
                if len(body) > self._max_bytes:
                    raise ProviderUnavailable("response_too_large", f"HTTP {response.status}")
                return response.status, response.headers, body
        except TimeoutError as err:
            raise ProviderUnavailable("timeout", "no answer in time") from err
        except aiohttp.ClientError as err:
            raise ProviderUnavailable("connection_error", type(err).__name__) from err


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
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    if "x-www-form-urlencoded" in content_type or ("=" in text and "<" not in text):
        pairs = parse_qsl(text, keep_blank_values=True)
        return dict(pairs) if pairs else None
    return None


def _token_set(fields: Mapping[str, Any], default_expires_in: int) -> TokenSet:
    access = fields.get("access_token")
    if not isinstance(access, str) or not access or len(access) > MAX_TOKEN_CHARS:
        raise ProviderUnavailable("malformed_response", "no usable access_token")
    refresh = fields.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or len(refresh) > MAX_TOKEN_CHARS):
        raise ProviderUnavailable("malformed_response", "unusable refresh_token")
    token_type = fields.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not token_type:
        raise ProviderUnavailable("malformed_response", "unusable token_type")
    scope = fields.get("scope")
    if scope is not None and (not isinstance(scope, str) or len(scope) > MAX_SCOPE_CHARS):
        scope = None
    expires_in = _expires_in(fields.get("expires_in"))
    return TokenSet(
        access_token=access,
        token_type="Bearer" if token_type.lower() == "bearer" else token_type,
        expires_in=default_expires_in if expires_in is None else expires_in,
        refresh_token=refresh or None,
        scope=scope,
        expires_stated=expires_in is not None,
    )


def _expires_in(value: Any) -> int | None:
    """Seconds, or None when not stated; form-encoded answers give strings, some providers
    omit it (Cloud 66, GitHub OAuth apps)."""
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        seconds = int(float(value))
    except (TypeError, ValueError, OverflowError):  # garbage, NaN, infinity
        return None
    return min(max(seconds, 1), MAX_EXPIRES_IN)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
