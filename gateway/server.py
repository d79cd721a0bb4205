"""`serve`: one or several aiohttp worker processes sharing the port, graceful on signals."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Coroutine
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web

from gateway.app import create_app
from gateway.deadlines import DeadlineSite
from gateway.logging import configure as configure_logging
from gateway.metrics import WORKER_STARTS
from gateway.metrics import multiprocess as metrics_multiprocess
from gateway.settings import Settings

log = structlog.get_logger(__name__)


def run_coroutine(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (Linux), else the default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


async def serve_forever(
    settings: Settings, *, reuse_port: bool, shutdown_timeout: float, worker: int = 0
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, finish in-flight requests, clean up."""
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    try:
        site = DeadlineSite(
            runner, settings.host, settings.port, reuse_port=reuse_port, backlog=2048,
            head_timeout=settings.http_header_timeout_seconds,
        )
        await site.start()
        WORKER_STARTS.inc()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("serving", host=settings.host, port=settings.port, worker=worker)
        await stop.wait()
        log.info("shutting_down", worker=worker, deadline_seconds=shutdown_timeout)
    finally:
        await runner.cleanup()
    log.info("stopped", worker=worker)


def _worker_main(settings: Settings, shutdown_timeout: float, worker: int) -> None:
    configure_logging(settings.log_level)
    run_coroutine(
        serve_forever(settings, reuse_port=True, shutdown_timeout=shutdown_timeout, worker=worker)
    )


def run(settings: Settings, *, workers: int, shutdown_timeout: float) -> int:
    """Serve with `workers` processes; the caller has resolved and migrated the database."""
    if workers <= 1:
        run_coroutine(
            serve_forever(settings, reuse_port=False, shutdown_timeout=shutdown_timeout)
        )
        return 0
    # the workers' metric files go to a fresh directory exported before they are spawned
    with metrics_multiprocess.shared_directory() as metrics_dir:
        log.info("metrics_multiprocess_dir", path=str(metrics_dir), workers=workers)
        return _run_workers(settings, workers, shutdown_timeout, metrics_dir)


def _run_workers(
    settings: Settings, workers: int, shutdown_timeout: float, metrics_dir: Path
) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_main, args=(settings, shutdown_timeout, n), name=f"sorami-worker-{n}"
        )
        for n in range(workers)
    ]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                proc.terminate() if signum == signal.SIGTERM else _send(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for proc in procs:
            proc.start()
        running: dict[int, BaseProcess] = {proc.sentinel: proc for proc in procs}
        while running:
            # reap workers in the order they exit, so a dead one's live gauges go at once
            for sentinel in wait(list(running)):
                exited = running.pop(cast(int, sentinel))  # wait() returns what it got
                exited.join()
                if exited.pid is not None:
                    metrics_multiprocess.worker_exited(exited.pid, metrics_dir)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, -signal.SIGTERM)]
    if failed and not stopping:
        print(f"sorami-gateway: worker exited with {failed}", file=sys.stderr)
        return 1
    return 0


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
