"""`sorami-reconcile` as operators and schedulers run it: real processes, exit codes, output."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.store import Database
from tests.factories import insert_job
from tests.procs import clean_env, free_port
from tests.test_reconcile import payload, record_orphan

RUN_KEYS = {
    "run_id", "state", "dry_run", "started_at", "finished_at", "duration_seconds",
    "parameters", "counts", "needs_review", "review", "review_truncated", "open_orphans",
    "errors", "error_count",
}
COUNT_KEYS = {
    "looked_at", "matched", "waiting", "ambiguous", "no_candidate", "expired",
    "apply_failed", "timed_out", "pruned", "needs_review",
}
REVIEW_KEYS = {
    "kind", "backend_job_id", "state", "outcome", "rule", "reason", "user_id", "prompt",
    "first_seen_at", "file_count", "event_count", "evidence",
}


class Done:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


async def start(database_url: str | None, *args: str, **env: str) -> asyncio.subprocess.Process:
    extra = {"DATABASE_URL": database_url} if database_url else {}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reconcile", *args,
        env=clean_env(**extra, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = 120) -> Done:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def cli(database_url: str | None, *args: str, **env: str) -> Done:
    return await finish(await start(database_url, *args, **env))


async def arrange(db: Database) -> None:
    """One orphan that matches, one left for review (two users sent its prompt)."""
    await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=300)
    await insert_job(db, user_id="user_b", prompt="a red fox", created_ago_seconds=300)
    await insert_job(db, user_id="user_c", prompt="a red fox", created_ago_seconds=300)
    await record_orphan(db, payload("bk-match", user_id="user_a", prompt="a cat"), seen_ago=120)
    await record_orphan(db, payload("bk-doubt", prompt="a red fox"), seen_ago=120)


async def test_run_prints_counts_and_a_table_of_what_needs_review(
    db: Database, database_url: str
) -> None:
    await arrange(db)

    done = await cli(database_url, "run")

    assert done.code == 0, done.err
    assert "orphans looked at  2" in done.out
    assert "matched          1" in done.out
    assert "ambiguous        1" in done.out
    assert "needs review       1" in done.out
    table = done.out.split("needs review (oldest first):\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["KIND", "BACKEND", "JOB"]
    assert table[1].split()[:5] == ["image", "bk-doubt", "unresolved", "ambiguous",
                                    "prompt_only"]
    assert "several jobs have this prompt" in table[1]


async def test_run_json_has_the_documented_shape(db: Database, database_url: str) -> None:
    await arrange(db)
    jobs = await db.fetchval("SELECT count(*) FROM jobs")

    done = await cli(database_url, "run", "--json", "--grace", "90s", "--window", "2h",
                     "--expire-after", "12h")
    changes = jobs + await db.fetchval(
        "SELECT count(*) FROM jobs WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED',"
        " 'TIMED_OUT')")

    assert done.code == 0, done.err
    result = done.json()
    assert set(result) == RUN_KEYS
    assert set(result["counts"]) == COUNT_KEYS
    assert result["state"] == "succeeded"
    assert result["dry_run"] is False
    assert result["parameters"]["grace_seconds"] == 90
    assert result["parameters"]["window_seconds"] == 7200
    assert result["parameters"]["expire_after_seconds"] == 43200
    assert result["parameters"]["image_timeout_seconds"] == 900
    assert (result["counts"]["matched"], result["counts"]["ambiguous"]) == (1, 1)
    assert result["counts"]["timed_out"] == {"image": 0, "video": 0}
    # the usage changes the jobs' inserts and the matched job's end left (no create folded them)
    assert result["counts"]["pruned"] == {"webhook_deliveries": 0, "outbox": 0,
                                          "reconcile_decisions": 0, "reconcile_runs": 0,
                                          "job_usage_changes": changes}
    assert await db.fetchval("SELECT count(*) FROM job_usage_changes") == 0
    assert result["needs_review"] == 1
    (item,) = result["review"]
    assert set(item) == REVIEW_KEYS
    assert (item["backend_job_id"], item["outcome"], item["prompt"]) == (
        "bk-doubt", "ambiguous", "a red fox")
    assert result["review_truncated"] is False
    assert result["open_orphans"] == {"unresolved": 1, "unmatched": 0}
    assert done.err.count("reconcile_run_finished") == 1  # logs go to stderr, not stdout


async def test_a_dry_run_says_so_and_changes_nothing(db: Database, database_url: str) -> None:
    await arrange(db)

    done = await cli(database_url, "run", "--dry-run", "--json")

    assert done.code == 0, done.err
    assert done.json()["dry_run"] is True
    assert done.json()["counts"]["matched"] == 1
    assert await db.fetchval("SELECT count(*) FROM job_aliases") == 0
    human = await cli(database_url, "run", "--dry-run")
    assert "(dry run: nothing was changed)" in human.out


async def test_fail_on_review_exits_3_when_an_orphan_needs_an_operator(
    db: Database, database_url: str
) -> None:
    await arrange(db)

    done = await cli(database_url, "run", "--fail-on-review")

    assert done.code == 3, done.err
    assert "needs review       1" in done.out
    await db.execute("UPDATE orphans SET state = 'dismissed' WHERE backend_job_id = 'bk-doubt'")
    assert (await cli(database_url, "run", "--fail-on-review")).code == 0


async def test_without_fail_on_review_a_run_that_leaves_doubts_exits_0(
    db: Database, database_url: str
) -> None:
    await arrange(db)

    assert (await cli(database_url, "run", "--json")).code == 0


async def test_a_run_that_could_not_apply_an_orphan_exits_1(
    db: Database, database_url: str
) -> None:
    await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=300)
    await record_orphan(db, payload("bad", user_id="user_a", prompt="a cat"), seen_ago=120)
    await db.execute(
        "INSERT INTO orphan_events (kind, backend_job_id, dedupe_key, event_status, payload)"
        " VALUES ('image', 'bad', 'broken', 'completed', '{\"job_id\": \"bad\"}')"
    )

    done = await cli(database_url, "run", "--json")

    assert done.code == 1
    result = done.json()
    assert (result["state"], result["error_count"], result["counts"]["apply_failed"]) == (
        "failed", 1, 1)
    assert "bad" in result["errors"][0]


async def test_an_unreachable_database_exits_1_with_a_message() -> None:
    done = await cli(f"postgresql://postgres@127.0.0.1:{free_port()}/none", "run")

    assert done.code == 1
    assert done.err.strip().splitlines()[-1].startswith("sorami-reconcile: error: database")
    assert done.out == ""


async def test_an_unmigrated_database_exits_1_saying_to_migrate(empty_database_url: str) -> None:
    done = await cli(empty_database_url, "run")

    assert done.code == 1
    assert "sorami-gateway migrate" in done.err


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["run", "--grace", "soon"], "--grace"),
        (["run", "--window", "0"], "--window"),
        (["run", "--expire-after", "-5"], "--expire-after"),
        (["run", "--pushgateway", "ftp://gateway"], "--pushgateway"),
        (["assign", "bk-1", "job-1", "--reason", "  "], "--reason"),
        (["dismiss", "bk-1"], "--reason"),
        (["orphans", "--status", "lost"], "--status"),
    ],
)
async def test_a_malformed_flag_exits_2_naming_it(
    database_url: str, args: list[str], flag: str
) -> None:
    done = await cli(database_url, *args)

    assert done.code == 2
    assert flag in done.err
    assert done.out == ""


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JOB_TIMEOUT_IMAGE_SECONDS", "soon"),
        ("JOB_TIMEOUT_VIDEO_SECONDS", "10"),
        ("DEDUPE_RETENTION_SECONDS", "-1"),
        ("DATABASE_URL", "mysql://db/sorami"),
    ],
)
async def test_a_malformed_setting_exits_2_naming_it(variable: str, value: str) -> None:
    done = await cli(None, "run", **{variable: value})

    assert done.code == 2
    assert done.err.strip().splitlines() == [
        line for line in done.err.strip().splitlines()
        if line.startswith(f"sorami-reconcile: error: {variable}:")
    ]


async def test_two_runs_started_together_do_the_work_once(
    db: Database, database_url: str
) -> None:
    jobs = [await insert_job(db, user_id=f"user_{n}", prompt="a cat", created_ago_seconds=300)
            for n in range(3)]
    for n in range(3):
        await record_orphan(db, payload(f"bk-{n}", user_id=f"user_{n}", prompt="a cat"),
                            seen_ago=120)
    async with db.transaction() as holder:
        # whichever process takes the run lock waits on this job's row until we let go
        await holder.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", jobs[0])
        procs = [await start(database_url, "run", "--json") for _ in range(2)]
        waits = [asyncio.ensure_future(finish(p)) for p in procs]
        first, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED, timeout=60)
        assert len(first) == 1
        skipped = first.pop().result()
    results = await asyncio.gather(*waits)

    assert skipped.code == 0, skipped.err
    assert skipped.json() == {"state": "skipped",
                              "reason": "another reconcile run is in progress; this one did "
                                        "nothing"}
    assert [r.code for r in results] == [0, 0], [r.err for r in results]
    (ran,) = [r for r in results if r is not skipped]
    assert ran.json()["counts"]["matched"] == 3
    assert await db.fetchval("SELECT count(*) FROM reconcile_runs") == 1
    assert await db.fetchval(
        "SELECT count(*) FROM reconcile_decisions WHERE outcome = 'matched'") == 3
    assert await db.fetchval("SELECT count(*) FROM notifications") == 3
    links = await db.fetch("SELECT backend_job_id, job_id FROM job_aliases ORDER BY job_id")
    assert sorted(link["job_id"] for link in links) == sorted(jobs)


async def test_the_runs_metrics_are_pushed_to_a_pushgateway(
    db: Database, database_url: str, aiohttp_server: Callable[..., Any]
) -> None:
    await arrange(db)
    pushed: list[tuple[str, str, str]] = []

    async def accept(request: web.Request) -> web.Response:
        pushed.append((request.method, request.path, await request.text()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", accept)
    server = await aiohttp_server(app)

    done = await cli(database_url, "run", "--pushgateway", f"http://127.0.0.1:{server.port}")

    assert done.code == 0, done.err
    ((method, path, body),) = pushed
    assert (method, path) == ("PUT", "/metrics/job/sorami_reconcile/mode/run")
    assert 'sorami_reconcile_run_orphans{outcome="matched"} 1.0' in body
    assert 'sorami_reconcile_run_orphans{outcome="ambiguous"} 1.0' in body
    assert "sorami_reconcile_run_needs_review 1.0" in body
    assert "sorami_reconcile_run_succeeded 1.0" in body
    assert 'sorami_reconcile_run_open_orphans{state="unresolved"} 1.0' in body
    values = dict(line.rsplit(" ", 1) for line in body.splitlines() if not line.startswith("#"))
    finished = await db.fetchval("SELECT extract(epoch FROM finished_at) FROM reconcile_runs")
    last_success = float(values["sorami_reconcile_run_last_success_timestamp_seconds"])
    assert last_success == pytest.approx(float(finished), abs=0.001)


async def test_a_pushgateway_that_does_not_answer_makes_the_run_exit_1(
    db: Database, database_url: str
) -> None:
    await arrange(db)

    done = await cli(database_url, "run", "--pushgateway", f"http://127.0.0.1:{free_port()}")

    assert done.code == 1
    assert "pushing metrics to" in done.err
    assert await db.fetchval("SELECT state FROM reconcile_runs") == "succeeded"


async def test_orphans_lists_the_open_ones_as_a_table_or_as_json(
    db: Database, database_url: str
) -> None:
    await arrange(db)
    await cli(database_url, "run")

    table = await cli(database_url, "orphans")
    as_json = await cli(database_url, "orphans", "--json")
    matched = await cli(database_url, "orphans", "--status", "matched", "--json")

    assert table.code == as_json.code == matched.code == 0
    lines = table.out.splitlines()
    assert lines[0].split()[:2] == ["KIND", "BACKEND"]
    assert lines[1].split()[:3] == ["image", "bk-doubt", "unresolved"]
    assert "ambiguous/prompt_only" in lines[1]
    assert lines[-1] == "1 orphan(s)"
    (listed,) = as_json.json()
    assert (listed["backend_job_id"], listed["prompt"], listed["last_decision"]["outcome"]) == (
        "bk-doubt", "a red fox", "ambiguous")
    (done,) = matched.json()
    assert (done["backend_job_id"], done["state"]) == ("bk-match", "matched")
    assert done["job_id"] is not None
    empty = await cli(database_url, "orphans", "--status", "dismissed", "--json")
    assert empty.json() == []


async def test_assign_and_dismiss_from_the_command_line_record_the_reason(
    db: Database, database_url: str
) -> None:
    await arrange(db)
    job_b = await db.fetchval("SELECT id FROM jobs WHERE user_id = 'user_b'")
    await record_orphan(db, payload("bk-stray", prompt="never asked"), seen_ago=120)

    assigned = await cli(database_url, "assign", "bk-doubt", job_b, "--reason",
                         "user_b confirmed")
    dismissed = await cli(database_url, "dismiss", "bk-stray", "--reason", "backend test call")
    again = await cli(database_url, "dismiss", "bk-stray", "--reason", "twice")
    unknown = await cli(database_url, "assign", "bk-none", job_b, "--reason", "r")

    assert assigned.code == 0, assigned.err
    assert f"to job {job_b} (user user_b)" in assigned.out
    assert dismissed.code == 0, dismissed.err
    rows = await db.fetch(
        "SELECT backend_job_id, outcome, actor, reason, job_id FROM reconcile_decisions"
        " WHERE actor = 'operator' ORDER BY id")
    assert [tuple(r.values()) for r in rows] == [
        ("bk-doubt", "assigned", "operator", "user_b confirmed", job_b),
        ("bk-stray", "dismissed", "operator", "backend test call", None),
    ]
    assert (again.code, unknown.code) == (1, 1)
    assert "is dismissed already" in again.err
    assert "no orphan has backend job id 'bk-none'" in unknown.err
