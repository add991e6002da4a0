"""``BrokerClient``: tokens from the broker, cached in the process, one fetch at a time per grant.

The cache trusts ``expires_in`` measured on this machine's monotonic clock from the moment the
request was sent, so a token is never believed to last longer than the broker said, whatever the
wall clocks of the two machines say.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from broker import __version__
from broker.client.errors import (
    BrokerError,
    BrokerUnreachable,
    TryLater,
    UnexpectedAnswer,
    error_from_answer,
)
from broker.client.retry import RetryPolicy, parse_retry_after
from broker.client.token import Token, token_from_body

__all__ = ["DEFAULT_MIN_TTL", "BrokerClient"]

log = logging.getLogger("broker.client")

DEFAULT_MIN_TTL = 30  # seconds; the broker's own default
DEFAULT_TIMEOUT = 30.0  # seconds for one request to the broker, refresh included
_JOINS = 2  # flights a caller waits for before it fetches on its own (a bounded loop)
_REQUEST_ID = "X-Request-Id"

_Key = tuple[str, str, str]  # ("user", provider, user id) or ("app", provider, scope set)


@dataclass(frozen=True, slots=True)
class _Entry:
    token: Token
    deadline: float | None  # time.monotonic() of expiry; None: no expiry

    def lasts(self, min_ttl: float) -> bool:
        if self.deadline is None:
            return True
        left = self.deadline - time.monotonic()
        return left > 0 and left >= min_ttl


def segment(value: str) -> str:
    """A path segment for any user id: every reserved byte percent-encoded, dots too (a bare
    ``.`` or ``..`` segment would be removed by URL normalisation on the way)."""
    return quote(value, safe="").replace(".", "%2E")


class BrokerClient:
    """A client of one broker, to share across the process: ``async with BrokerClient(url,
    key) as client: token = await client.token("alfresco", "u-1")``.

    Tokens are cached per (provider, user id) and per (provider, scope set) for app tokens,
    and served from the cache while they still last the ``min_ttl`` asked; concurrent callers
    missing the cache share one request. The API key is never logged or shown.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        min_ttl: int = DEFAULT_MIN_TTL,
        retry: RetryPolicy | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.min_ttl = min_ttl
        self.retry = retry or RetryPolicy()
        self._api_key = api_key
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._cache: dict[_Key, _Entry] = {}
        self._flights: dict[_Key, asyncio.Task[_Entry]] = {}  # the one whose answer is newest
        self._reports: dict[tuple[_Key, str], asyncio.Task[_Entry]] = {}
        self._generation: dict[_Key, int] = {}  # a report bumps it: older fetches don't cache

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "User-Agent": f"broker-client/{__version__}",
            },
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop fetches in the air and close the HTTP session; the cache is forgotten."""
        tasks = {*self._flights.values(), *self._reports.values()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._cache.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def token(self, provider: str, user_id: str, *, min_ttl: int | None = None) -> Token:
        """An access token for the user that stays valid ``min_ttl`` seconds at least (the
        client's default when None), from the cache when the cached one does."""
        ttl = self.min_ttl if min_ttl is None else min_ttl
        path = f"/v1/tokens/{segment(provider)}/{segment(user_id)}"
        fetch = partial(self._request, "GET", path, {"min_ttl": ttl})
        return await self._cached(("user", provider, user_id), ttl, fetch)

    async def app_token(
        self, provider: str, scope: str | None = None, *, min_ttl: int | None = None
    ) -> Token:
        """An access token for the provider's own client (client credentials), cached per
        scope set as ``token`` caches user tokens."""
        ttl = self.min_ttl if min_ttl is None else min_ttl
        scopes = " ".join(sorted(set(scope.split()))) if scope else ""
        query: dict[str, Any] = {"min_ttl": ttl}
        if scopes:
            query["scope"] = scopes
        fetch = partial(self._request, "GET", f"/v1/app-tokens/{segment(provider)}", query)
        return await self._cached(("app", provider, scopes), ttl, fetch)

    async def report_rejected(self, provider: str, user_id: str, rejected: Token | str) -> Token:
        """Tell the broker a resource server refused this token (401); returns its
        replacement. The rejected token leaves the cache; concurrent reports of one token
        make one request, and a report of a token already replaced makes none."""
        key: _Key = ("user", provider, user_id)
        value = rejected.access_token if isinstance(rejected, Token) else rejected
        entry = self._cache.get(key)
        if entry is not None and entry.token.access_token == value:
            del self._cache[key]
        elif entry is not None and entry.lasts(0):
            return entry.token
        flight = self._reports.get((key, value))
        if flight is None:
            self._generation[key] = self._generation.get(key, 0) + 1  # fetches in the air
            path = f"/v1/tokens/{segment(provider)}/{segment(user_id)}/refresh"
            body = {"rejected_token": value}
            flight = self._fly(key, partial(self._request, "POST", path, None, body))
            self._reports[(key, value)] = flight
            flight.add_done_callback(partial(self._forget, self._reports, (key, value)))
        return (await asyncio.shield(flight)).token

    async def _cached(self, key: _Key, ttl: int, fetch: Callable[[], Awaitable[_Entry]]) -> Token:
        for _ in range(_JOINS):
            entry = self._cache.get(key)
            if entry is not None and entry.lasts(ttl):
                return entry.token
            flight = self._flights.get(key)
            if flight is None:
                break
            entry = await asyncio.shield(flight)
            if entry.lasts(ttl):
                return entry.token
        return (await asyncio.shield(self._fly(key, fetch))).token

    def _fly(self, key: _Key, fetch: Callable[[], Awaitable[_Entry]]) -> asyncio.Task[_Entry]:
        """A fetch its callers share; a task, so a caller that gives up cancels only its wait."""
        task = asyncio.create_task(self._land(key, fetch, self._generation.get(key, 0)))
        self._flights[key] = task
        task.add_done_callback(partial(self._forget, self._flights, key))
        return task

    async def _land(
        self, key: _Key, fetch: Callable[[], Awaitable[_Entry]], generation: int
    ) -> _Entry:
        entry = await fetch()
        if self._generation.get(key, 0) == generation:  # no report made this answer stale
            self._cache[key] = entry
        return entry

    @staticmethod
    def _forget(
        flights: dict[Any, asyncio.Task[_Entry]], key: Any, task: asyncio.Task[_Entry]
    ) -> None:
        if flights.get(key) is task:
            del flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have given up before it failed

    async def _request(
        self, method: str, path: str, query: dict[str, Any] | None, body: Any = None
    ) -> _Entry:
        """One call to the broker with the retry policy; the token and its monotonic expiry."""
        if self._session is None:
            raise RuntimeError("use BrokerClient as `async with BrokerClient(...) as client:`")
        url = URL(self.base_url + path + (f"?{urlencode(query)}" if query else ""), encoded=True)
        waited = 0.0
        for attempt in range(1, self.retry.attempts + 1):
            sent = time.monotonic()
            try:
                return await self._answer(self._session, method, url, body, sent)
            except (TryLater, BrokerUnreachable) as err:
                error: BrokerError = err
            retry_after = error.retry_after if isinstance(error, TryLater) else None
            delay = self.retry.wait(attempt, retry_after)
            if attempt == self.retry.attempts or waited + delay > self.retry.max_wait:
                raise error
            log.warning(
                "broker answered %s to %s %s; retry %d in %.1f s",
                error.code, method, path, attempt, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
            waited += delay
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _answer(
        self, session: aiohttp.ClientSession, method: str, url: URL, body: Any, sent: float
    ) -> _Entry:
        try:
            async with session.request(method, url, json=body) as response:
                request_id = response.headers.get(_REQUEST_ID)
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = None
                if response.status != 200:
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), time.time()
                    )
                    raise error_from_answer(
                        response.status, data, request_id=request_id, retry_after=retry_after
                    )
        except aiohttp.ClientConnectionError as err:
            raise BrokerUnreachable(type(err).__name__) from None
        except TimeoutError:
            raise BrokerUnreachable(f"no answer within {self._timeout} s") from None
        try:
            token = token_from_body(data)
        except ValueError as err:
            raise UnexpectedAnswer(
                f"not a token: {err}", status=response.status, request_id=request_id
            ) from None
        return _Entry(token, None if token.expires_in is None else sent + token.expires_in)
