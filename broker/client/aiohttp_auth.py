"""An aiohttp client middleware (aiohttp >= 3.12) that puts a broker token on each request."""

from __future__ import annotations

from aiohttp import ClientHandlerType, ClientMiddlewareType, ClientRequest, ClientResponse, hdrs

from broker.client.client import BrokerClient

__all__ = ["aiohttp_middleware"]


def aiohttp_middleware(
    client: BrokerClient, provider: str, user_id: str, *, min_ttl: int | None = None
) -> ClientMiddlewareType:
    """A middleware sending the user's token; on a 401 it reports the token to the broker and
    retries once with the replacement. A second 401 is returned as it is: no loop.

    ``aiohttp.ClientSession(middlewares=(aiohttp_middleware(client, "alfresco", "u-1"),))``,
    or per request: ``session.get(url, middlewares=(...,))``.
    """

    async def send_with_token(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        token = await client.token(provider, user_id, min_ttl=min_ttl)
        request.headers[hdrs.AUTHORIZATION] = token.authorization
        response = await handler(request)
        if response.status != 401:
            return response
        response.release()  # the connection goes back to the pool for the retry
        fresh = await client.report_rejected(provider, user_id, token)
        request.headers[hdrs.AUTHORIZATION] = fresh.authorization
        return await handler(request)

    return send_with_token
