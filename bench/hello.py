"""The baseline of ``bench/run.py``: the smallest aiohttp app that answers every path, on the
same Python and the same event loop as ``broker serve``.

    python bench/hello.py --port 8081
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def hello(_: web.Request) -> web.Response:
    return web.Response(text="Hello, world")


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/{tail:.*}", hello)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
