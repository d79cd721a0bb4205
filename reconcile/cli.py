"""`sorami-reconcile`: the operator's batch job.

Exit codes: 0 done (or another run was in progress), 1 error, 2 malformed setting or flag,
3 with --fail-on-review when an orphan needs an operator.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import structlog

from gateway import embedded
from gateway.errors import GatewayError
from gateway.jobs.kinds import Kind
from gateway.logging import configure as configure_logging
from gateway.settings import Settings, SettingsError, parse_duration
from gateway.store.database import Database
from gateway.store.errors import StoreUnavailable
from gateway.store.migrations import is_current
from gateway.usecases import legacy_import, operators
from reconcile import legacy as legacy_report
from reconcile import metrics, report
from reconcile.runner import RunOptions, run_once

log = structlog.get_logger(__name__)

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_REVIEW: Final = 3
PROG: Final = "sorami-reconcile"


def _duration(flag: str, *, zero_ok: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        seconds = parse_duration(text)
        if seconds is None or seconds < 0 or (seconds == 0 and not zero_ok):
            least = "0 or more" if zero_ok else "more than 0"
            raise argparse.ArgumentTypeError(
                f"{flag} must be a duration of {least} seconds like 90, 90s, 15m, 6h; "
                f"got {text[:20]!r}"
            )
        return seconds

    return parse


def _pushgateway_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"--pushgateway must be an http(s) URL, got {text!r}")
    return text.rstrip("/")


def _reason(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("--reason must say why")
    return text.strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Match orphaned backend job ids to the jobs they belong to.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="one pass: match orphans, time out stale jobs, prune old records"
    )
    run.add_argument("--dry-run", action="store_true",
                     help="decide and report as a run would, change nothing")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--grace", type=_duration("--grace", zero_ok=True), default=60.0,
                     metavar="S", help="orphans younger than this wait (default 60)")
    run.add_argument("--window", type=_duration("--window", zero_ok=False), default=21600.0,
                     metavar="S",
                     help="candidate jobs are created at most this long before the orphan "
                          "was first seen (default 6h)")
    run.add_argument("--expire-after", type=_duration("--expire-after", zero_ok=False),
                     default=86400.0, metavar="S",
                     help="orphans still unmatched this long after first seen become "
                          "'unmatched' (default 24h)")
    run.add_argument("--fail-on-review", action="store_true",
                     help="exit 3 when anything needs an operator")
    run.add_argument("--pushgateway", type=_pushgateway_url, metavar="URL",
                     help="push the run's metrics to this Prometheus Pushgateway")

    orphans = commands.add_parser("orphans", help="list orphans and their latest decision")
    orphans.add_argument("--status", choices=operators.STATUS_CHOICES, default="open",
                         help="which orphans (default open: unresolved and unmatched)")
    orphans.add_argument("--json", action="store_true", help="print a JSON array")

    kinds = [k.value for k in Kind]
    assign = commands.add_parser("assign", help="attach an orphan to a job by hand")
    assign.add_argument("backend_job_id", metavar="BACKEND_JOB_ID")
    assign.add_argument("job_id", metavar="JOB_ID")
    assign.add_argument("--reason", type=_reason, required=True, help="why (recorded)")
    assign.add_argument("--kind", choices=kinds,
                        help="the orphan's kind (default: the kind of the orphan with that id)")
    assign.add_argument("--allow-other-user", action="store_true",
                        help="allow a job of another user than the one the orphan names")

    dismiss = commands.add_parser("dismiss", help="close an orphan that belongs to no job")
    dismiss.add_argument("backend_job_id", metavar="BACKEND_JOB_ID")
    dismiss.add_argument("--reason", type=_reason, required=True, help="why (recorded)")
    dismiss.add_argument("--kind", choices=kinds,
                         help="the orphan's kind (default: the kind of the orphan with that id)")
    _legacy_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        with embedded.resolved(settings) as ready:
            return _run_async(_COMMANDS[args.command](ready, args))
    except SettingsError as error:
        print(f"{PROG}: error: {error.variable}: {error.problem}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as error:
        print(f"{PROG}: error: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except GatewayError as error:
        print(f"{PROG}: error: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        log.exception("reconcile_command_failed", command=args.command)
        print(f"{PROG}: error: {error!r}", file=sys.stderr)
        return EXIT_ERROR


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    """On uvloop where it is installed (Linux): a pass is thousands of small queries."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _open(settings: Settings, *, size: int) -> Database:
    assert settings.database_url is not None  # embedded.resolved gave one
    db = await Database.open(settings.database_url.reveal(), min_size=1, max_size=size)
    async with db.connection() as conn:
        current = await is_current(conn)
    if not current:
        await db.close()
        raise GatewayError("the database schema is not current: run `sorami-gateway migrate`")
    return db


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    options = RunOptions.from_settings(
        settings,
        dry_run=args.dry_run,
        grace_seconds=args.grace,
        window_seconds=args.window,
        expire_after_seconds=args.expire_after,
    )
    db = await _open(settings, size=options.concurrency + 2)
    try:
        result = await run_once(db, options)
    finally:
        await db.close()
    if result is None:
        message = "another reconcile run is in progress; this one did nothing"
        if args.json:
            report.write_json(sys.stdout, {"state": "skipped", "reason": message})
        else:
            print(f"{PROG}: {message}")
        return EXIT_OK
    if args.json:
        report.write_json(sys.stdout, report.run_json(result))
    else:
        report.write_run_summary(sys.stdout, result)
    code = EXIT_OK
    if args.pushgateway:
        try:
            await asyncio.to_thread(metrics.push, args.pushgateway, result)
        except OSError as error:
            print(f"{PROG}: error: pushing metrics to {args.pushgateway} failed: {error}",
                  file=sys.stderr)
            code = EXIT_ERROR
    if not result.succeeded:
        return EXIT_ERROR
    if code == EXIT_OK and args.fail_on_review and result.needs_review:
        return EXIT_REVIEW
    return code


async def _orphans(settings: Settings, args: argparse.Namespace) -> int:
    db = await _open(settings, size=2)
    try:
        rows = operators.list_orphans(db, args.status)
        if args.json:
            await report.write_orphans_json(sys.stdout, rows)
        else:
            await report.write_orphans_table(sys.stdout, rows)
    finally:
        await db.close()
    return EXIT_OK


async def _assign(settings: Settings, args: argparse.Namespace) -> int:
    db = await _open(settings, size=2)
    try:
        done = await operators.assign(
            db, args.backend_job_id, args.job_id, reason=args.reason,
            kind=Kind(args.kind) if args.kind else None,
            allow_other_user=args.allow_other_user,
        )
    finally:
        await db.close()
    print(f"assigned {done.kind.value} orphan {done.backend_job_id} to job {done.job_id} "
          f"(user {done.user_id}): {done.replayed} event(s) replayed, the job is "
          f"{done.job_status}; decision {done.decision_id}")
    return EXIT_OK


async def _dismiss(settings: Settings, args: argparse.Namespace) -> int:
    db = await _open(settings, size=2)
    try:
        done = await operators.dismiss(
            db, args.backend_job_id, reason=args.reason,
            kind=Kind(args.kind) if args.kind else None,
        )
    finally:
        await db.close()
    print(f"dismissed {done.kind.value} orphan {done.backend_job_id} "
          f"(was {done.previous_state}); decision {done.decision_id}")
    return EXIT_OK


# taking over from the existing app

def _legacy_parser(commands: Any) -> None:
    imports = commands.add_parser(
        "import-legacy", help="import the existing app's Prisma database (read-only)")
    imports.add_argument("--from", dest="source", required=True, metavar="URL",
                         help="the existing app's PostgreSQL URL (only read)")
    imports.add_argument("--dry-run", action="store_true",
                         help="report what an import would do, write nothing")
    imports.add_argument("--json", action="store_true", help="print the report as JSON")


async def _import_legacy(settings: Settings, args: argparse.Namespace) -> int:
    db = await _open(settings, size=2)
    progress = legacy_report.ProgressLine()
    try:
        result = await legacy_import.import_legacy(args.source, db, dry_run=args.dry_run,
                                                   progress=progress)
    finally:
        progress.close()
        await db.close()
    if args.json:
        report.write_json(sys.stdout, legacy_report.report_json(result))
    else:
        legacy_report.write_summary(sys.stdout, result)
    return EXIT_OK


_COMMANDS = {"run": _run, "orphans": _orphans, "assign": _assign, "dismiss": _dismiss,
             "import-legacy": _import_legacy}


if __name__ == "__main__":
    sys.exit(main())
