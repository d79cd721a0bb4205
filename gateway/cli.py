"""`sorami-gateway`: serve, migrate, token."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from gateway import embedded, limits_cli, server
from gateway.auth import dev_token
from gateway.errors import GatewayError
from gateway.logging import configure as configure_logging
from gateway.settings import Settings, SettingsError
from gateway.store.migrations import migrate

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sorami-gateway",
        description="Exactly-once gateway between the Sorami app and its generator backend.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: PORT or 8080)")
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    serve.add_argument(
        "--no-migrate", action="store_true", help="do not apply pending migrations at start"
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=25.0,
        help="seconds to finish in-flight requests on SIGTERM (default 25)",
    )

    commands.add_parser("migrate", help="apply pending sql/ migrations and exit")

    token = commands.add_parser("token", help="print a development HS256 token")
    token.add_argument("--user", required=True, help="the user id (the token's sub)")
    token.add_argument("--org", help="an org_id claim")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")

    sim = commands.add_parser(
        "simulate-backend",
        help="run a simulated generator backend that sends signed webhooks",
        description="The Flask backend's routes and webhook sequence, with its failure modes: "
        "honest, own-uuid, lost-answer, no-hints, duplicates, out-of-order, fail, slow "
        "(combine with '+', mix with ',').",
    )
    sim.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=9006, help="listen port (default 9006)")
    sim.add_argument(
        "--webhook-base",
        default="http://127.0.0.1:8080",
        help="the gateway's base URL (default http://127.0.0.1:8080)",
    )
    sim.add_argument(
        "--mode", default="honest", help="behaviour mix, e.g. 'honest,own-uuid+no-hints'"
    )
    sim.add_argument(
        "--step-delay", type=float, default=1.0, help="seconds between webhooks (default 1)"
    )
    sim.add_argument(
        "--legacy",
        action="store_true",
        help="send X-Webhook-Secret (LEGACY_WEBHOOK_SECRET) instead of signatures",
    )

    demo = commands.add_parser(
        "demo",
        help="run the whole flow on the embedded default against the simulated backend",
    )
    demo.add_argument(
        "--jobs", type=int, default=16, help="jobs to submit (at least the 16 of the base plan)"
    )
    demo.add_argument("--fast", action="store_true", help="short webhook delays (for CI)")

    limits_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "serve":
            overrides: dict[str, object] = {}
            if args.host:
                overrides["host"] = args.host
            if args.port is not None:
                overrides["port"] = args.port
            settings = settings.replace(**overrides) if overrides else settings
        configure_logging(settings.log_level)
        return _COMMANDS[args.command](settings, args)
    except SettingsError as error:
        print(f"sorami-gateway: error: {error.variable}: {error.problem}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as error:
        print(f"sorami-gateway: error: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise SettingsError("--workers", "must be at least 1")
    with embedded.resolved(settings) as ready:
        ready.check_serving()
        if not args.no_migrate:
            _migrate_now(ready)
        return server.run(ready, workers=args.workers, shutdown_timeout=args.shutdown_timeout)


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    with embedded.resolved(settings) as ready:
        applied = _migrate_now(ready)
    print(f"sorami-gateway: {len(applied)} migration(s) applied" if applied
          else "sorami-gateway: database is up to date")
    return 0


def _migrate_now(settings: Settings) -> list[str]:
    assert settings.database_url is not None
    applied = asyncio.run(migrate(settings.database_url.reveal()))
    return [f"{m.version:04d}_{m.name}" for m in applied]


def _token(settings: Settings, args: argparse.Namespace) -> int:
    if settings.auth_hs256_secret is None and settings.embedded and not settings.auth_jwks_url:
        settings = embedded.with_dev_secrets(settings)
    print(dev_token(settings, args.user, org_id=args.org, ttl=args.ttl))
    return 0


def _simulate_backend(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.simulator import ModeError, SimulatedBackend, SimulatorConfig, parse_mix

    try:
        mix = parse_mix(args.mode)
    except ModeError as error:
        raise SettingsError("--mode", str(error)) from None
    secret: str | None = None
    legacy: str | None = None
    if args.legacy:
        if settings.legacy_webhook_secret is None:
            raise SettingsError("LEGACY_WEBHOOK_SECRET", "is required with --legacy")
        legacy = settings.legacy_webhook_secret.reveal()
    else:
        if not settings.webhook_secrets and settings.embedded:
            settings = embedded.with_dev_secrets(settings)
        if not settings.webhook_secrets:
            raise SettingsError("WEBHOOK_SECRETS", "is required to sign webhooks")
        secret = settings.webhook_secrets[0].reveal()
    config = SimulatorConfig(
        webhook_base=args.webhook_base,
        webhook_secret=secret,
        legacy_secret=legacy,
        mix=mix,
        step_delay=args.step_delay,
    )
    backend = SimulatedBackend(config, public_url=f"http://{args.host}:{args.port}")
    web.run_app(backend.app(), host=args.host, port=args.port, print=None)
    return 0


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from gateway import demo

    if not settings.embedded_allowed:
        raise SettingsError("SORAMI_EMBEDDED", "the demo needs the embedded PostgreSQL")
    # the demo's own tables tell the story (orphans and retries are part of it)
    configure_logging("error")
    return demo.run(settings.data_dir, jobs=args.jobs, fast=args.fast)


def _limits(settings: Settings, args: argparse.Namespace) -> int:
    with embedded.resolved(settings) as ready:
        return limits_cli.run(ready, args)


_COMMANDS = {
    "serve": _serve,
    "migrate": _migrate,
    "token": _token,
    "simulate-backend": _simulate_backend,
    "demo": _demo,
    "limits": _limits,
}


if __name__ == "__main__":
    sys.exit(main())
