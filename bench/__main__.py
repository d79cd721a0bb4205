"""`python -m bench ingest|create|reconcile|sse|review|all`: run, print the table, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import ensure_tool, machine_info, result_dir, run_id
from bench.report import Figure, table, write_json

BENCHMARKS = ("ingest", "create", "sse", "reconcile", "review")
# run only when named: `python -m bench import` (the module is bench.legacy_import)
ON_REQUEST = {"import": "legacy_import"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of sorami-gateway, each as a ratio to the limit measured "
        "in the same run on this machine.",
    )
    parser.add_argument("benchmark", choices=(*BENCHMARKS, *ON_REQUEST, "all"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="repetitions of ingest and create (a range is reported; default 3)")
    parser.add_argument("--preload", type=int, default=100_000,
                        help="jobs preloaded for ingest (default 100000)")
    parser.add_argument("--ingest-jobs", type=int, default=16_000,
                        help="jobs that get webhooks per ingest repetition (default 16000: "
                        "40000 requests)")
    parser.add_argument("--workers", type=int, default=1,
                        help="`serve --workers N` for ingest and create (default 1: on two "
                        "cores shared with PostgreSQL, one worker leaves it the other)")
    parser.add_argument("--bare", action="store_true",
                        help="ingest against bench.bare_server (the same statement and nothing "
                        "else: what the gateway's own work costs) instead of the gateway")
    parser.add_argument("--creates", type=int, default=20_000,
                        help="job creations per create repetition (default 20000)")
    parser.add_argument("--user-limits", choices=("off", "on"), default="off",
                        help="create: per-user limits off (0), or on and set high enough that "
                        "none refuses (their lock and counts are measured) (default off)")
    parser.add_argument("--batch-max", type=int, default=None,
                        help="ingest and create: WEBHOOK_BATCH_MAX and CREATE_BATCH_MAX of the "
                        "server (0: group commit off, one transaction per request; default: "
                        "the gateway's default)")
    parser.add_argument("--subscribers", type=int, default=1000,
                        help="SSE subscribers (default 1000)")
    parser.add_argument("--sse-jobs", type=int, default=100,
                        help="jobs changing once a second (default 100)")
    parser.add_argument("--sse-seconds", type=int, default=30,
                        help="seconds of changes (default 30)")
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="reconcile sizes in jobs (default 10000,100000,1000000)")
    parser.add_argument("--review-orphans", type=int, default=100_000,
                        help="orphans in the review list benchmark (default 100000)")
    parser.add_argument("--review-requests", type=int, default=1000,
                        help="list requests measured (default 1000)")
    parser.add_argument("--quiet-load", type=float, default=1.0,
                        help="wait for the 1-minute load average to fall under this "
                        "before each run (default 1.0)")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="seconds to wait at most for that (default 120)")
    parser.add_argument("--generations", type=int, default=1_000_000,
                        help="legacy generations for import, each with two files and one "
                        "notification (default 1000000)")
    parser.add_argument("--profile", action="store_true",
                        help="record py-spy profiles of the server processes (first run)")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    return parser


async def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    chosen = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    ensure_tool("pgbench")
    run = run_id()
    out = result_dir(run)
    info = await machine_info()
    print(f"bench {run}: {info['nproc']} cores, load {info['loadavg_before']}, "
          f"PostgreSQL {info['postgresql']}, results in {out}", flush=True)
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    started = time.monotonic()
    for name in chosen:
        module = importlib.import_module(f"bench.{ON_REQUEST.get(name, name)}")
        found, detail = await module.run(args, out)
        figures += found
        details[name] = detail
        print(table(found), flush=True)
    print()
    print(table(figures))
    for figure in figures:
        if figure.note:
            print(f"  {figure.bench} {figure.name}: {figure.note}")
    data = {
        "run": run,
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "seconds": round(time.monotonic() - started, 1),
        "figures": [f.as_dict() for f in figures],
        "details": details,
    }
    write_json(out / "results.json", data)
    write_json(out.parent / "latest.json", data)
    print(f"\nJSON: {out / 'results.json'}")
    return 0 if all(f.met is not False for f in figures) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_main(argv))


if __name__ == "__main__":
    sys.exit(main())
