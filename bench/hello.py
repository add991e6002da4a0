"""The baselines of ``bench/run.py``, on the same Python and the same event loop as
``broker serve``:

- the hello-world: the smallest aiohttp app, one handler answering every path;
- ``--shaped``: the *floor* of a token request, everything aiohttp does for one without any of
  broker's work: broker's route table, three middleware layers (broker has three) that set the
  ``X-Request-Id`` header, and a constant token answer as large as broker's, with its headers.
  The gap between the two is what the framework costs for that request's shape; the gap
  between the floor and broker is broker's own work (docs/performance.md).

    python bench/hello.py --port 8081 [--shaped]
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web
from aiohttp.typedefs import Handler
from seeding import AT_MARK  # bench/, beside this file

from broker.api_base import NO_STORE
from broker.routes import OPERATIONS

# A token answer as broker writes it for a seeded grant (same fields, same sizes).
TOKEN = json.dumps(
    {
        "access_token": AT_MARK,
        "token_type": "Bearer",
        "expires_at": "2026-12-03T23:59:59Z",
        "expires_in": 3599,
        "scope": "offline_access",
    }
)


async def hello(_: web.Request) -> web.Response:
    return web.Response(text="Hello, world")


async def token(_: web.Request) -> web.Response:
    return web.Response(text=TOKEN, content_type="application/json", headers=NO_STORE)


@web.middleware
async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers["X-Request-Id"] = "00112233445566770000002a"
    return response


@web.middleware
async def passing(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)


def app(shaped: bool = False) -> web.Application:
    if not shaped:
        application = web.Application()
        application.router.add_get("/{tail:.*}", hello)
        return application
    application = web.Application(middlewares=[request_id, passing, passing])
    for op in OPERATIONS:
        handler = token if op.operation_id == "getToken" else hello
        application.router.add_route(op.method, op.path, handler)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shaped", action="store_true", help="the floor of a token request")
    args = parser.parse_args()
    web.run_app(app(args.shaped), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
