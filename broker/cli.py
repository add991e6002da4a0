"""The ``broker`` command: serve, demo, keygen, apikey, check-config, openapi,
config-schema, grants list, rekey."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from functools import partial

from broker.auth import hash_key, new_api_key
from broker.config import Settings, load_settings
from broker.crypto import new_key
from broker.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="broker", description="OAuth2 token broker")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the service"),
        ("check-config", "validate a configuration and print a summary"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--config",
            "-c",
            default=os.environ.get("BROKER_CONFIG"),
            help="TOML file (default: $BROKER_CONFIG)",
        )
        sub.add_argument(
            "--workers",
            type=_at_least(1),
            metavar="N",
            help="processes serving the port, sharing the work through Redis; /metrics adds "
            "them up (default: the workers setting, 1)",
        )
    demo = commands.add_parser(
        "demo",
        help="see the whole product on this machine: fake provider, broker, a connected user",
        description="Start a fake provider and a broker in this process (no Redis needed), "
        "connect a demo user through the authorization-code flow, then show the grant being "
        "refreshed in the background before each expiry, until Ctrl-C.",
    )
    demo.add_argument(
        "--token-ttl",
        type=_at_least(5),
        default=30,
        metavar="SECONDS",
        help="lifetime of the fake provider's access tokens (default 30, at least 5)",
    )
    demo.add_argument("--duration", type=_positive, metavar="SECONDS", help="stop after this long")
    demo.add_argument(
        "--refreshes",
        type=_at_least(1),
        metavar="N",
        help="stop after N background refreshes (exit status 1 if --duration ends first)",
    )
    demo.add_argument("--once", action="store_true", help="connect, show one status, stop")
    demo.add_argument("--port", type=int, default=0, help="broker's port (default: any free)")
    demo.add_argument("--verbose", "-v", action="store_true", help="show broker's own logs")
    commands.add_parser("keygen", help="print a new encryption key for BROKER_ENCRYPTION_KEYS")
    commands.add_parser("apikey", help="print a new client API key and its key_sha256")
    commands.add_parser(
        "config-schema",
        help="print the JSON Schema of broker.toml (top level, providers, clients)",
    )
    openapi = commands.add_parser(
        "openapi",
        help="print the OpenAPI document (broker/openapi.json is this, for default settings)",
    )
    openapi.add_argument(
        "--config", "-c", help="TOML file: the document as that configuration serves it"
    )
    grants = commands.add_parser("grants", help="inspect the grants in the configured Redis")
    grants_commands = grants.add_subparsers(dest="grants_command", required=True)
    listing = grants_commands.add_parser(
        "list",
        help="list one provider's grants (statuses, never a secret)",
        description="Read the grants of one provider straight from the configured Redis, "
        "decrypting with BROKER_ENCRYPTION_KEYS, and print their statuses: a table, or one JSON "
        "object per line (the same as GET /v1/grants/{provider}). Records that cannot be "
        "decrypted are named on stderr.",
    )
    listing.add_argument(
        "--config",
        "-c",
        default=os.environ.get("BROKER_CONFIG"),
        help="TOML file (default: $BROKER_CONFIG)",
    )
    listing.add_argument("--provider", "-p", required=True, help="the provider's name")
    listing.add_argument(
        "--state",
        choices=["active", "refresh_failing", "reauth_required"],
        help="only grants in this state",
    )
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    rekey = commands.add_parser(
        "rekey",
        help="re-encrypt every record under the first key of BROKER_ENCRYPTION_KEYS",
        description="Re-encrypt every stored record (grants, pending authorizations) under the "
        "first key of BROKER_ENCRYPTION_KEYS while the service runs; a record a replica changes "
        "meanwhile is never overwritten. Resumable and idempotent: run it again after an "
        "interruption. Exit status: 0 every record is under the first key; 1 some are not yet "
        "(dry run, --limit, Redis failed, records kept changing); 2 unusable configuration; 3 "
        "records that cannot be decrypted (counted, never shown); 4 refused: a running process "
        "still encrypts with another key (named; nothing was rewritten).",
    )
    rekey.add_argument(
        "--config",
        "-c",
        default=os.environ.get("BROKER_CONFIG"),
        help="TOML file (default: $BROKER_CONFIG)",
    )
    rekey.add_argument("--dry-run", action="store_true", help="count only; write nothing")
    rekey.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary")
    rekey.add_argument(
        "--limit",
        type=_at_least(1),
        metavar="N",
        help="stop after re-encrypting N records (spread the work over several runs)",
    )
    args = parser.parse_args(argv)

    if args.command == "keygen":
        print(new_key())
    elif args.command == "apikey":
        key = new_api_key()
        print(f"api key (give it to the client; it is not stored): {key}")
        print(f'key_sha256 (put it in [[clients]]):               "{hash_key(key)}"')
    elif args.command == "openapi":
        from broker.openapi import default_limits, render
        from broker.routes import Limits

        limits = default_limits() if args.config is None else Limits.of(_settings(args.config))
        sys.stdout.buffer.write(render(limits).encode("utf-8"))
    elif args.command == "config-schema":
        from broker.settings_docs import config_schema

        print(json.dumps(config_schema(), indent=2))
    elif args.command == "check-config":
        settings = _settings(args.config, args.workers)
        print(_summary(settings))
    elif args.command == "grants":
        from broker.grants_cli import list_grants
        from broker.logs import configure_logging

        settings = _settings(args.config)
        configure_logging(settings.log_format, settings.log_level)  # stderr: stdout is data
        raise SystemExit(list_grants(settings, args.provider, args.state, as_json=args.json))
    elif args.command == "rekey":
        from broker.logs import configure_logging
        from broker.rekey_cli import RekeyOptions
        from broker.rekey_cli import rekey as run_rekey

        settings = _settings(args.config)
        configure_logging(settings.log_format, settings.log_level)  # stderr
        raise SystemExit(
            run_rekey(
                settings, RekeyOptions(dry_run=args.dry_run, quiet=args.quiet, limit=args.limit)
            )
        )
    elif args.command == "demo":
        from broker.demo import DemoOptions, run

        options = DemoOptions(
            token_ttl=args.token_ttl,
            duration=args.duration,
            refreshes=args.refreshes,
            once=args.once,
            port=args.port,
            verbose=args.verbose,
        )
        raise SystemExit(run(options))
    else:
        _serve(_settings(args.config, args.workers), args.config)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def _settings(path: str | None, workers: int | None = None) -> Settings:
    if workers is not None:
        # --workers is BROKER_WORKERS: it wins over the file, is validated with the rest, and
        # a SIGHUP reload (which reads the environment again) sees the same value.
        os.environ["BROKER_WORKERS"] = str(workers)
    try:
        return load_settings(path, os.environ)
    except ConfigError as err:
        print(f"broker: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _summary(s: Settings) -> str:
    lines = [
        "configuration ok",
        f"  store:     {s.redis_url_safe}"
        + ("  (embedded, NOT durable)" if s.is_memory_store else ""),
        f"  listen:    {s.host}:{s.port}   public_url: {s.public_url}"
        + (f"   workers: {s.workers}" if s.workers > 1 else ""),
        "  keys:      "
        + (
            "throwaway (set BROKER_ENCRYPTION_KEYS)"
            if s.ephemeral_encryption_key
            else ", ".join(kid for kid, _ in s.encryption_keys)
        ),
        f"  providers: {', '.join(s.providers) or '(none)'}",
    ]
    for c in s.clients:
        line = f"  client:    {c.name}  {sorted(c.permissions)}  providers={list(c.providers)}"
        line += f"  keys={len(c.key_sha256)}"
        if c.user_ids is not None:
            line += f"  user_ids={list(c.user_ids)}"
        if c.rate_limit is not None:
            line += (
                f"  rate_limit={c.rate_limit.requests_per_second:g}/s burst {c.rate_limit.burst}"
            )
        lines.append(line)
    return "\n".join(lines)


def _serve(settings: Settings, config_path: str | None) -> None:
    from broker.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    if settings.workers > 1:
        from broker.workers import supervise

        raise SystemExit(supervise(settings, partial(_worker, settings, config_path)))
    _run(settings, config_path)


def _worker(
    settings: Settings,
    config_path: str | None,
    sockets: list[socket.socket],
    number: int,
    ready: Callable[[], None],
) -> None:
    """One process of ``--workers`` (broker.workers): the app on the supervisor's sockets."""
    from broker.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level, worker=number)
    _run(settings, config_path, sockets, ready)


def _run(
    settings: Settings,
    config_path: str | None,
    sockets: list[socket.socket] | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    from aiohttp import web

    from broker.app import create_app

    try:
        app = create_app(settings, reload_on_sighup=True, config_path=config_path)
        if ready is not None:
            app.on_startup.append(_call(ready))  # after the cleanup contexts have started
        web.run_app(
            app,
            host=None if sockets else settings.host,
            port=None if sockets else settings.port,
            sock=sockets,
            shutdown_timeout=settings.shutdown_timeout,
            access_log=None,
            print=None,
        )
    except ConfigError as err:  # found at start-up: a provider's discovery failed
        print(f"broker: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _call(ready: Callable[[], None]) -> Callable[[object], Awaitable[None]]:
    async def call(_: object) -> None:
        ready()

    return call


if __name__ == "__main__":
    main()
