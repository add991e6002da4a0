"""An ``httpx.Auth`` that puts a broker token on each request (``pip install 'broker[httpx]'``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from broker.client.client import BrokerClient

__all__ = ["HttpxAuth"]


class HttpxAuth(httpx.Auth):
    """Sends the user's token; on a 401 it reports the token to the broker and retries once
    with the replacement. A second 401 is returned as it is: no loop.

    ``httpx.AsyncClient(auth=HttpxAuth(client, "alfresco", "u-1"))``; async clients only.
    """

    requires_request_body = True  # read a streamed body once, so the retry can send it again

    def __init__(
        self, client: BrokerClient, provider: str, user_id: str, *, min_ttl: int | None = None
    ) -> None:
        self._client = client
        self.provider = provider
        self.user_id = user_id
        self.min_ttl = min_ttl

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("HttpxAuth needs httpx.AsyncClient: BrokerClient is asynchronous")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._client.token(self.provider, self.user_id, min_ttl=self.min_ttl)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code != 401:
            return
        fresh = await self._client.report_rejected(self.provider, self.user_id, token)
        request.headers["Authorization"] = fresh.authorization
        yield request  # httpx closes the first answer; whatever this one is, it is final
