"""A provider's API on loopback for the client library's auth helpers: it accepts an access
token only while the dev provider's introspection (RFC 7662) says it is active, as a real
resource server does, and records every request it sees."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.devprovider import DevProvider


@dataclass(frozen=True, slots=True)
class Seen:
    token: str
    body: bytes


@dataclass
class ResourceServer:
    url: str
    seen: list[Seen] = field(default_factory=list)
    always_401: bool = False  # refuse every token, valid or not


def client_auth(provider: DevProvider) -> dict[str, str]:
    """The dev provider's client credentials as a Basic ``Authorization`` header."""
    pair = f"{provider.settings.client_id}:{provider.settings.client_secret}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


@asynccontextmanager
async def resource_server(provider: DevProvider) -> AsyncIterator[ResourceServer]:
    """``/data`` answers 200 with the request body to a live token, else 401."""
    async with aiohttp.ClientSession() as http:
        server = ResourceServer("")
        credentials = client_auth(provider)

        async def active(token: str) -> bool:
            form = {"token": token, "token_type_hint": "access_token"}
            async with http.post(provider.introspection_url, data=form, headers=credentials) as r:
                answer = await r.json()
            return answer.get("active") is True and answer.get("token_type") == "Bearer"

        async def data(request: web.Request) -> web.Response:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            server.seen.append(Seen(token, await request.read()))
            if server.always_401 or scheme != "Bearer" or not await active(token):
                return web.Response(
                    status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
                )
            return web.Response(body=await request.read())

        app = web.Application()
        app.router.add_route("*", "/data", data)
        test_server = TestServer(app)
        await test_server.start_server()
        server.url = str(test_server.make_url("/data"))
        try:
            yield server
        finally:
            await test_server.close()
