"""`serve --workers N` replaces a worker that dies, and gives up on workers that cannot start."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp

from gateway.jobs.state import Status
from gateway.server import (
    RESTART_DELAY_FIRST,
    RESTART_DELAY_MAX,
    STABLE_SECONDS,
    STARTUP_FAILURES_LIMIT,
    _Slot,
)
from gateway.store import Database
from tests.conftest import HS256_SECRET, WEBHOOK_SECRET
from tests.factories import insert_job
from tests.metrics_helpers import Scrape
from tests.procs import Proc, clean_env, free_port, start, wait_ready
from tests.test_metrics_workers import get, json_lines
from tests.test_sse import next_event, read_block
from tests.tokens import user

REQUESTS = 40
STREAMS = 16
REPLACED_WITHIN = 10.0  # seconds from the kill until the replacement has answered a request
SHUTDOWN_TIMEOUT = 10.0


def test_restart_delays_double_to_the_cap_and_reset_after_a_stable_run() -> None:
    slot = _Slot(0, ctypes.c_bool(False))
    delays = [slot.exited(served=False, up=1.0) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert slot.startup_failures == 9
    # served, but died soon after: no longer a startup failure, still backing off
    assert slot.exited(served=True, up=STABLE_SECONDS - 1) == RESTART_DELAY_MAX
    assert slot.startup_failures == 0
    # served for a while: the next delay is the first again, and doubles from there
    assert slot.exited(served=True, up=STABLE_SECONDS) == RESTART_DELAY_FIRST
    assert slot.exited(served=False, up=1.0) == 2 * RESTART_DELAY_FIRST
    assert slot.startup_failures == 1


def events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(proc.stderr) if line["event"] == name]


def unmatched_served_by(proc: Proc) -> list[object]:
    return [line["pid"] for line in events(proc, "http_request")
            if line["route"] == "unmatched"]


async def still_open(stream: aiohttp.ClientResponse) -> bool:
    """False once the server's end of the stream is gone; True while it stays silent."""
    try:
        return await read_block(stream, seconds=2) is not None
    except TimeoutError:
        return True  # no heartbeat is due: silence means the worker holding it lives
    except aiohttp.ClientError:
        return False


async def test_a_killed_worker_is_replaced_and_the_metrics_stay_right(
    database_url: str, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.GENERATING)  # its stream stays open
    port = free_port()
    env = clean_env(
        DATABASE_URL=database_url,
        WEBHOOK_SECRETS=WEBHOOK_SECRET,
        AUTH_HS256_SECRET=HS256_SECRET,
        PORT=str(port),
        SSE_HEARTBEAT_SECONDS="600",
    )
    proc = start(
        ["serve", "--workers", "2", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], env
    )
    streams: list[aiohttp.ClientResponse] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    session = aiohttp.ClientSession(connector=connector)
    try:
        await proc.wait_log('"event": "serving"', count=2)
        await wait_ready(port, timeout=10)
        victim = next(line["pid"] for line in events(proc, "serving") if line["worker"] == 0)

        answers = await asyncio.gather(*(get(port, f"/no/such/{n}") for n in range(REQUESTS)))
        assert [status for status, _ in answers] == [404] * REQUESTS
        await proc.wait_log('"route": "unmatched"', count=REQUESTS)
        assert victim in unmatched_served_by(proc)  # what it counted must not be lost

        # long requests in flight on both workers: the victim's must leave the gauge
        for _ in range(STREAMS):
            stream = await session.get(
                f"http://127.0.0.1:{port}/api/jobs/{job_id}/events", headers=user()
            )
            assert stream.status == 200
            streams.append(stream)
            assert await next_event(stream) is not None

        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        await proc.wait_log('"event": "serving"', count=3, timeout=REPLACED_WITHIN)
        replacement = next(line["pid"] for line in events(proc, "serving")
                           if line["pid"] not in {victim} and line["worker"] == 0)
        sent = REQUESTS
        while replacement not in unmatched_served_by(proc):
            assert time.monotonic() - killed_at < REPLACED_WITHIN, proc.stderr[-3000:]
            status, _ = await get(port, f"/after/{sent}")
            assert status == 404
            sent += 1
            await proc.wait_log('"route": "unmatched"', count=sent)

        died = events(proc, "worker_died")
        assert len(died) == 1
        assert died[0]["level"] == "error"
        assert died[0]["worker"] == 0
        assert died[0]["worker_pid"] == victim
        assert died[0]["signal"] == "SIGKILL"
        assert died[0]["exit_code"] is None
        assert died[0]["served"] is True
        assert died[0]["restart_in_seconds"] == 0.5

        open_now = await asyncio.gather(*(still_open(stream) for stream in streams))
        assert not all(open_now), "no stream was on the killed worker"
        status, text = await get(port, "/metrics")
        assert status == 200
    finally:
        for stream in streams:
            stream.close()
        await session.close()
        stopping_at = time.monotonic()
        code, err = proc.stop()
        stopped_in = time.monotonic() - stopping_at
    assert code == 0, err
    assert stopped_in < SHUTDOWN_TIMEOUT
    assert err.count('"event": "stopped"') == 2  # the survivor and the replacement

    found = Scrape(text)
    assert found.value("sorami_worker_restarts_total") == 1
    assert found.value("sorami_worker_starts_total") == 3
    assert found.get(
        "sorami_http_request_duration_seconds_count",
        method="GET", route="unmatched", status_class="4xx",
    ) == sent
    # the surviving worker's streams and this scrape; none of the dead worker's
    assert found.value("sorami_http_requests_in_flight") == sum(open_now) + 1


def test_workers_that_cannot_start_make_serve_give_up(database_url: str) -> None:
    # another program holds the port without SO_REUSEPORT: only the workers find out
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
            env=clean_env(
                DATABASE_URL=database_url,
                WEBHOOK_SECRETS=WEBHOOK_SECRET,
                AUTH_HS256_SECRET=HS256_SECRET,
                PORT=str(port),
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"sorami-gateway: error: every worker exited before serving {STARTUP_FAILURES_LIMIT} "
        "times in a row (last: worker 0 exit code 1; worker 1 exit code 1); giving up, see "
        "the worker_died log lines for the cause"
    )
    failed = [line for line in json_lines(result.stderr) if line["event"] == "worker_failed"]
    assert len(failed) >= 2 * STARTUP_FAILURES_LIMIT - 1
    for line in failed:
        assert line["level"] == "error"
        assert "address already in use" in str(line["exception"]).lower()
    assert '"event": "serving"' not in result.stderr
    died = [line for line in json_lines(result.stderr) if line["event"] == "worker_died"]
    for worker in (0, 1):
        delays = [line["restart_in_seconds"] for line in died if line["worker"] == worker]
        # backing off, doubling, and then no more restarts
        assert STARTUP_FAILURES_LIMIT <= len(delays) <= STARTUP_FAILURES_LIMIT + 1
        assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
        assert all(line["served"] is False for line in died)
    assert died[-1]["restart_in_seconds"] is None
    assert died[-1]["startup_failures_in_a_row"] == STARTUP_FAILURES_LIMIT


async def test_sigterm_while_a_replacement_waits_its_delay_exits_0_at_once(
    database_url: str,
) -> None:
    shutdown_timeout = 3.0
    with socket.socket() as holder:  # the workers fail at startup, as above
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = start(
            ["serve", "--workers", "2", "--shutdown-timeout", str(shutdown_timeout)],
            clean_env(
                DATABASE_URL=database_url,
                WEBHOOK_SECRETS=WEBHOOK_SECRET,
                AUTH_HS256_SECRET=HS256_SECRET,
                PORT=str(port),
            ),
        )
        try:
            # both workers wait 4 s to be replaced, none runs: the signal must not wait
            await proc.wait_log('"restart_in_seconds": 4.0', count=2, timeout=60)
        finally:
            stopping_at = time.monotonic()
            code, err = proc.stop()
            stopped_in = time.monotonic() - stopping_at
    assert code == 0, err
    assert stopped_in < shutdown_timeout
    assert "giving up" not in err
    died = [line for line in json_lines(err) if line["event"] == "worker_died"]
    assert max(line["startup_failures_in_a_row"] for line in died) < STARTUP_FAILURES_LIMIT
