"""`serve`: aiohttp worker processes sharing the port, replaced if they die, stopped on signals."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web

from gateway.app import create_app
from gateway.deadlines import DeadlineSite
from gateway.logging import configure as configure_logging
from gateway.metrics import WORKER_RESTARTS, WORKER_STARTS
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
    settings: Settings,
    *,
    reuse_port: bool,
    shutdown_timeout: float,
    worker: int = 0,
    serving: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, finish in-flight requests, clean up.

    `serving` is called once the port is bound and requests are answered.
    """
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
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's full passes, whose pauses land on requests in flight.
        gc.collect()
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("serving", host=settings.host, port=settings.port, worker=worker)
        if serving is not None:
            serving()
        await stop.wait()
        log.info("shutting_down", worker=worker, deadline_seconds=shutdown_timeout)
    finally:
        await runner.cleanup()
    log.info("stopped", worker=worker)


def _worker_main(
    settings: Settings,
    shutdown_timeout: float,
    worker: int,
    served: ctypes.c_bool,
    replacement: bool,
) -> None:
    if replacement:
        WORKER_RESTARTS.inc()  # first, so that a replacement failing at startup counts too
    configure_logging(settings.log_level)

    def serving() -> None:
        served.value = True

    try:
        run_coroutine(
            serve_forever(
                settings,
                reuse_port=True,
                shutdown_timeout=shutdown_timeout,
                worker=worker,
                serving=serving,
            )
        )
    except Exception:
        # one JSON line with the traceback instead of multiprocessing's bare one
        log.exception("worker_failed", worker=worker)
        sys.exit(1)


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
        return _Supervisor(settings, workers, shutdown_timeout, metrics_dir).run()


# a worker that dies is replaced after a delay doubling from the first to the cap on each
# death in a row; one that served for STABLE_SECONDS before dying starts from the first again
RESTART_DELAY_FIRST = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_SECONDS = 60.0
# when every worker has exited this many times in a row without serving, serve gives up
STARTUP_FAILURES_LIMIT = 5
# after SIGTERM, workers still running this long after the shutdown timeout are killed
STOP_GRACE_SECONDS = 5.0


@dataclass
class _Slot:
    """One of the N workers: its current process, and how its recent ones fared."""

    number: int
    served: ctypes.c_bool
    proc: BaseProcess | None = None
    started_at: float = 0.0
    delay: float = RESTART_DELAY_FIRST
    startup_failures: int = 0
    restart_at: float | None = None
    last_exit: str = ""

    def exited(self, *, served: bool, up: float) -> float:
        """Count a death of this slot's worker; the delay before its replacement starts."""
        if served:
            self.startup_failures = 0
            if up >= STABLE_SECONDS:
                self.delay = RESTART_DELAY_FIRST
        else:
            self.startup_failures += 1
        restart_in = self.delay
        self.delay = min(self.delay * 2, RESTART_DELAY_MAX)
        return restart_in


class _Supervisor:
    """Starts the workers, replaces those that die, forwards SIGTERM/SIGINT to them."""

    def __init__(
        self, settings: Settings, workers: int, shutdown_timeout: float, metrics_dir: Path
    ) -> None:
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        self.metrics_dir = metrics_dir
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = [
            _Slot(n, self.ctx.RawValue(ctypes.c_bool, False)) for n in range(workers)
        ]
        self.stopping = False
        self.gave_up = False
        self.kill_at: float | None = None
        # the signal handler writes here so that a wait for the next restart ends at once
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in self.slots:
                self._spawn(slot, replacement=False)
            self._supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self.wake_read)
            os.close(self.wake_write)
        if self.gave_up:
            print(
                f"sorami-gateway: error: every worker exited before serving "
                f"{STARTUP_FAILURES_LIMIT} times in a row (last: "
                f"{'; '.join(f'worker {s.number} {s.last_exit}' for s in self.slots)}); "
                "giving up, see the worker_died log lines for the cause",
                file=sys.stderr,
            )
            return 1
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_write, b"\0")

    def _stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            self.kill_at = time.monotonic() + self.shutdown_timeout + STOP_GRACE_SECONDS
        for slot in self.slots:
            slot.restart_at = None
            if slot.proc is not None and slot.proc.pid is not None:
                _send(slot.proc.pid, signum)

    def _spawn(self, slot: _Slot, *, replacement: bool) -> None:
        slot.served.value = False
        slot.restart_at = None
        slot.proc = self.ctx.Process(
            target=_worker_main,
            args=(self.settings, self.shutdown_timeout, slot.number, slot.served, replacement),
            name=f"sorami-worker-{slot.number}",
        )
        slot.started_at = time.monotonic()
        slot.proc.start()
        if self.stopping and slot.proc.pid is not None:
            # a signal came while it was being started, after the others were told
            _send(slot.proc.pid, signal.SIGTERM)

    def _supervise(self) -> None:
        while True:
            running = {slot.proc.sentinel: slot for slot in self.slots if slot.proc is not None}
            if self.stopping and not running:
                return
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            if self.kill_at is not None:
                due.append(self.kill_at)
            timeout = max(0.0, min(due) - now) if due else None
            for ready in wait([*running, self.wake_read], timeout):
                if ready == self.wake_read:
                    os.read(self.wake_read, 64)
                else:
                    self._reap(running[cast(int, ready)])  # wait() returns what it got
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at:
                self.kill_at = None
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.pid is not None:
                        log.error("worker_killed", worker=slot.number, worker_pid=slot.proc.pid,
                                  reason="still running after the shutdown timeout")
                        _send(slot.proc.pid, signal.SIGKILL)
            for slot in self.slots:
                if slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                    self._spawn(slot, replacement=True)

    def _reap(self, slot: _Slot) -> None:
        """The slot's worker exited: drop its live gauges, and replace it unless stopping."""
        proc = slot.proc
        assert proc is not None
        assert proc.pid is not None
        slot.proc = None  # before it is reaped: a signal forwarded now cannot hit a new pid
        proc.join()
        # its counters stay in the directory, so the sums keep what it counted
        metrics_multiprocess.worker_exited(proc.pid, self.metrics_dir)
        if self.stopping:
            return
        code = proc.exitcode
        assert code is not None
        up = time.monotonic() - slot.started_at
        served = bool(slot.served.value)
        restart_in = slot.exited(served=served, up=up)
        slot.last_exit = _describe_exit(code)
        give_up = all(s.startup_failures >= STARTUP_FAILURES_LIMIT for s in self.slots)
        log.error(
            "worker_died",
            worker=slot.number,
            worker_pid=proc.pid,
            exit_code=code if code >= 0 else None,
            signal=signal.Signals(-code).name if code < 0 and _is_signal(-code) else None,
            uptime_seconds=round(up, 3),
            served=served,
            startup_failures_in_a_row=slot.startup_failures,
            restart_in_seconds=None if give_up else restart_in,
        )
        if give_up:
            self.gave_up = True
            log.critical("workers_failing_at_startup", limit=STARTUP_FAILURES_LIMIT)
            self._stop(signal.SIGTERM)
        else:
            slot.restart_at = time.monotonic() + restart_in


def _is_signal(number: int) -> bool:
    try:
        signal.Signals(number)
    except ValueError:
        return False
    return True


def _describe_exit(code: int) -> str:
    if code < 0 and _is_signal(-code):
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
