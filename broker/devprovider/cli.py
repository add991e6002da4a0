"""``python -m broker.devprovider``: the dev provider as a process of its own."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from typing import get_args

from broker.devprovider.provider import DevProvider
from broker.devprovider.settings import ClientAuth, DevProviderSettings


async def _serve(provider: DevProvider, host: str, port: int, public_url: str | None) -> None:
    await provider.start(host, port)
    if public_url:
        provider.base_url = public_url.rstrip("/")
    print(f"dev provider listening on {provider.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await provider.close()


def main(argv: list[str] | None = None) -> None:
    """Run the provider until SIGINT/SIGTERM (``broker demo``, docker-compose)."""
    from broker import devprovider  # imported by now: its docstring is the --help text

    parser = argparse.ArgumentParser(
        prog="python -m broker.devprovider", description=devprovider.__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--access-token-ttl", type=int, default=3600, metavar="SECONDS")
    parser.add_argument(
        "--client-token-ttl",
        type=int,
        metavar="SECONDS",
        help="lifetime of client-credentials tokens (default: --access-token-ttl)",
    )
    parser.add_argument("--no-rotation", action="store_true", help="keep refresh tokens")
    parser.add_argument(
        "--forgive-reuse",
        action="store_true",
        help="count a reused rotated-out refresh token but do not revoke its grant",
    )
    parser.add_argument("--form-encoded", action="store_true", help="form-encoded token answers")
    parser.add_argument(
        "--no-refresh-tokens",
        action="store_true",
        help="codes buy an access token alone (Cloud 66, GitHub OAuth apps)",
    )
    parser.add_argument("--no-expires-in", action="store_true", help="answers omit expires_in")
    parser.add_argument("--no-scope", action="store_true", help="answers omit scope")
    parser.add_argument(
        "--client-auth", default="client_secret_basic", choices=get_args(ClientAuth)
    )
    parser.add_argument("--client-id", default=DevProviderSettings.client_id)
    parser.add_argument("--client-secret-env", metavar="VAR", help="take the secret from $VAR")
    parser.add_argument("--public-url", help="base URL to advertise (e.g. behind docker)")
    args = parser.parse_args(argv)
    settings = DevProviderSettings(
        client_id=args.client_id,
        client_auth=args.client_auth,
        access_token_ttl=args.access_token_ttl,
        client_token_ttl=args.client_token_ttl,
        rotate_refresh_tokens=not args.no_rotation,
        revoke_on_reuse=False if args.forgive_reuse else None,
        form_encoded=args.form_encoded,
        issue_refresh_tokens=not args.no_refresh_tokens,
        include_expires_in=not args.no_expires_in,
        include_scope=not args.no_scope,
    )
    if args.client_secret_env:
        secret = os.environ.get(args.client_secret_env)
        if not secret:
            parser.error(f"environment variable {args.client_secret_env} is not set")
        settings.client_secret = secret
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(DevProvider(settings), args.host, args.port, args.public_url))
