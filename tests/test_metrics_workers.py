"""`serve --workers 2`: one scrape sums every worker's counters, database gauges once."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest

from gateway.jobs.state import Status
from gateway.metrics import multiprocess
from gateway.store import Database
from tests.factories import insert_job
from tests.metrics_helpers import Scrape, needs_promtool, promtool_check_metrics
from tests.procs import free_port, serve_env, start, wait_ready

REQUESTS = 40


def json_lines(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(repr(line)) from None
    return out


async def get(port: int, path: str) -> tuple[int, str]:
    # a new connection each time: SO_REUSEPORT spreads connections, not requests
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


def files_in(path: Path) -> int | None:
    """How many files the directory holds; None when it does not exist."""
    return len(list(path.iterdir())) if path.is_dir() else None


async def test_one_scrape_sums_the_counters_of_both_workers(
    database_url: str, db: Database
) -> None:
    for _ in range(3):
        await insert_job(db, status=Status.QUEUED)
    port = free_port()
    env = serve_env(database_url, PORT=str(port))
    proc = start(["serve", "--workers", "2"], env)
    try:
        await proc.wait_log('"event": "serving"', count=2)
        await wait_ready(port, timeout=10)
        answers = await asyncio.gather(
            *(get(port, f"/no/such/{n}") for n in range(REQUESTS))
        )
        assert [status for status, _ in answers] == [404] * REQUESTS
        await proc.wait_log('"route": "unmatched"', count=REQUESTS)
        status, text = await get(port, "/metrics")
        assert status == 200
        metrics_dir = Path(str(next(
            line["path"] for line in json_lines(proc.stderr)
            if line["event"] == "metrics_multiprocess_dir"
        )))
        assert files_in(metrics_dir)
    finally:
        code, err = proc.stop()
    assert code == 0, err

    found = Scrape(text)
    assert found.value("sorami_worker_starts_total") == 2
    assert found.get(
        "sorami_http_request_duration_seconds_count",
        method="GET", route="unmatched", status_class="4xx",
    ) == REQUESTS
    served_by = {
        line["pid"] for line in json_lines(err)
        if line["event"] == "http_request" and line["route"] == "unmatched"
    }
    assert len(served_by) == 2  # both workers answered, and the one scrape saw them all
    # computed by the scraped worker alone, not once per worker
    assert found.value("sorami_jobs", kind="image", status="QUEUED") == 3
    assert found.value("sorami_database_up") == 1
    assert files_in(metrics_dir) is None  # removed at exit


@needs_promtool
async def test_a_multiprocess_scrape_passes_promtool_check_metrics(database_url: str) -> None:
    port = free_port()
    env = serve_env(database_url, PORT=str(port))
    proc = start(["serve", "--workers", "2"], env)
    try:
        await proc.wait_log('"event": "serving"', count=2)
        await wait_ready(port, timeout=10)
        await get(port, "/nope")
        _, text = await get(port, "/metrics")
    finally:
        code, err = proc.stop()
    assert code == 0, err
    result = promtool_check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_an_inherited_multiproc_dir_is_the_parent_of_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(multiprocess.ENV, str(tmp_path))
    stale = tmp_path / "counter_1.db"
    stale.write_bytes(b"old run")
    with multiprocess.shared_directory() as path:
        assert path.parent == tmp_path
        assert os.environ[multiprocess.ENV] == str(path)
        assert list(path.iterdir()) == []  # nothing of an earlier run is summed
        (path / f"counter_{os.getpid() + 1}.db").write_bytes(b"worker")
    assert os.environ[multiprocess.ENV] == str(tmp_path)
    assert not path.exists()
    assert stale.exists()  # not this run's to delete


def test_without_an_inherited_dir_the_variable_is_unset_after_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(multiprocess.ENV, raising=False)
    with multiprocess.shared_directory() as path:
        assert os.environ[multiprocess.ENV] == str(path)
        assert path.is_dir()
    assert multiprocess.ENV not in os.environ
    assert not path.exists()
