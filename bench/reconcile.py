"""The reconciler at scale: `python -m reconcile run --json` on 10,000 / 100,000 / 1,000,000
jobs of which a tenth have lost their webhooks to orphans, of mixed kinds and evidence.

Per size, a fresh database is filled in SQL (generate_series): jobs of both kinds, most of
them finished long ago, and one orphan per ten jobs, each made for one job:

- 60 % name their user, with a prompt of that user's job: matched by user and prompt;
- 20 % name no user, with a prompt only their job has: matched by prompt alone;
- 10 % name no user, with a prompt two jobs of two users have: ambiguous, left for review;
- 10 % name a user and a prompt no job has: no candidate, left for review.

Each orphan carries one completion event with two files. Measured: the run's wall time and
the peak RSS of the reconcile process (from wait4), and afterwards every orphan is checked:
the matched ones on the job they were made for (its alias, the job COMPLETED with the
orphan's files), the others on no job, and no other alias anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import ROOT, gateway_env, scratch_database, wait_for_quiet
from bench.report import Figure
from gateway.jobs.prompts import normalize

# orphan k is made for job k (types A, B, C); C also gets a decoy job, D has no job
GENERATE = """
WITH params AS (SELECT $1::int AS n, $2::int AS m, now() - interval '3 hours' AS t0)
INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, params, status, progress, message,
                  created_at, updated_at, first_webhook_at, finished_at, seq)
SELECT id, kind::job_kind, user_id, prompt, prompt, '{}', status::job_status, progress,
       'bench', created_at, updated_at, first_webhook_at, finished_at, 1
FROM (
    -- the jobs orphans were made for: k in [0, m), type k % 10 (0-5 A, 6-7 B, 8 C, 9 D)
    SELECT 'job-' || k AS id,
           CASE WHEN k % 2 = 0 THEN 'image' ELSE 'video' END AS kind,
           'user_' || (k % 5000) AS user_id,
           CASE WHEN k % 10 < 6 THEN 'a lost portrait number ' || k
                WHEN k % 10 < 8 THEN 'a lost landscape number ' || k
                ELSE 'a shared still life number ' || k END AS prompt,
           'QUEUED' AS status, 0 AS progress,
           p.t0 + k * interval '50 milliseconds' AS created_at,
           now() - interval '1 minute' AS updated_at,
           NULL::timestamptz AS first_webhook_at, NULL::timestamptz AS finished_at
    FROM params p, generate_series(0, p.m - 1) AS k
    WHERE k % 10 <> 9
    UNION ALL
    -- the decoys of the ambiguous ones: the same prompt, another user, also waiting
    SELECT 'decoy-' || k, CASE WHEN k % 2 = 0 THEN 'image' ELSE 'video' END,
           'user_' || ((k + 1) % 5000), 'a shared still life number ' || k,
           'QUEUED', 0, p.t0 + k * interval '50 milliseconds' - interval '10 seconds',
           now() - interval '1 minute', NULL, NULL
    FROM params p, generate_series(0, p.m - 1) AS k
    WHERE k % 10 = 8
    UNION ALL
    -- everything else: most finished long ago, some still running, prompts shared widely
    SELECT 'other-' || i, CASE WHEN i % 3 = 0 THEN 'video' ELSE 'image' END,
           'user_' || (i % 5000), 'a red fox in the snow, take ' || (i % 20000),
           CASE WHEN i % 10 < 7 THEN 'COMPLETED' WHEN i % 10 < 8 THEN 'FAILED'
                ELSE 'GENERATING' END,
           CASE WHEN i % 10 < 7 THEN 100 ELSE 40 END,
           p.t0 - interval '1 day' + i * interval '100 milliseconds',
           now() - interval '1 minute',
           p.t0 - interval '1 day' + i * interval '100 milliseconds' + interval '5 seconds',
           CASE WHEN i % 10 < 8
                THEN p.t0 - interval '1 day' + i * interval '100 milliseconds'
                     + interval '30 seconds' END
    FROM params p, generate_series(0, p.n - (p.m - p.m / 10) - p.m / 10 - 1) AS i
) AS all_jobs
"""

ORPHANS = """
WITH params AS (SELECT $1::int AS m, now() - interval '3 hours' AS t0),
made AS (
    SELECT k, CASE WHEN k % 2 = 0 THEN 'image' ELSE 'video' END AS kind,
           'bk-' || k AS backend_job_id,
           CASE WHEN k % 10 < 6 OR k % 10 = 9 THEN 'user_' || (k % 5000) END AS user_id,
           CASE WHEN k % 10 < 6 THEN 'a lost portrait number ' || k
                WHEN k % 10 < 8 THEN 'a lost landscape number ' || k
                WHEN k % 10 = 8 THEN 'a shared still life number ' || k
                ELSE 'a prompt no job has, number ' || k END AS prompt,
           p.t0 + k * interval '50 milliseconds' + interval '30 seconds' AS first_seen_at
    FROM params p, generate_series(0, p.m - 1) AS k
), o AS (
    INSERT INTO orphans (kind, backend_job_id, state, user_id, prompt, prompt_norm,
                         file_count, event_count, first_seen_at, last_seen_at)
    SELECT kind::job_kind, backend_job_id, 'unresolved', user_id, prompt, prompt, 2, 1,
           first_seen_at, first_seen_at
    FROM made
), d AS (
    INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id, event_status,
                                    outcome, received_at)
    SELECT 'id:orphan-' || k, kind::job_kind, backend_job_id, NULL, 'completed', 'orphaned',
           first_seen_at
    FROM made
)
INSERT INTO orphan_events (kind, backend_job_id, dedupe_key, event_status, payload,
                           received_at)
SELECT kind::job_kind, backend_job_id, 'id:orphan-' || k, 'completed',
       jsonb_strip_nulls(jsonb_build_object(
           'job_id', backend_job_id, 'status', 'completed', 'progress', 100,
           'message', 'done', 'user_id', user_id, 'original_prompt', prompt,
           'data', jsonb_build_object(
               CASE WHEN kind = 'image' THEN 'images' ELSE 'videos' END,
               jsonb_build_array(
                   jsonb_build_object('url', 'https://cdn.sorami.example/' || k || '/0',
                                      'format', 'png', 'size_bytes', 1000 + k,
                                      'dimensions', '1024x1024'),
                   jsonb_build_object('url', 'https://cdn.sorami.example/' || k || '/1',
                                      'format', 'png', 'size_bytes', 2000 + k,
                                      'dimensions', '1024x1024')),
               'metadata', jsonb_build_object('model_name', 'bench-model',
                                              'generation_time_seconds', 3.5)))),
       first_seen_at
FROM made
"""

# Every orphan where it should be: A and B on job-k (alias, COMPLETED, 2 files), C and D on
# nothing (unresolved), and no alias that is not one of those.
CHECK = """
WITH expected AS (
    SELECT o.kind, o.backend_job_id, substr(o.backend_job_id, 4)::int AS k, o.state,
           o.job_id
    FROM orphans o
)
SELECT
  count(*) FILTER (WHERE e.k % 10 < 8) AS should_match,
  count(*) FILTER (WHERE e.k % 10 < 8 AND e.state = 'matched' AND e.job_id = 'job-' || e.k
                   AND a.job_id = 'job-' || e.k AND j.status = 'COMPLETED'
                   AND (SELECT count(*) FROM job_files f WHERE f.job_id = j.id) = 2)
      AS matched_right,
  count(*) FILTER (WHERE e.k % 10 >= 8) AS should_wait,
  count(*) FILTER (WHERE e.k % 10 >= 8 AND e.state = 'unresolved' AND e.job_id IS NULL
                   AND a.job_id IS NULL) AS left_alone,
  (SELECT count(*) FROM job_aliases) AS aliases,
  (SELECT count(*) FROM jobs WHERE id LIKE 'decoy-%' AND status <> 'QUEUED') AS decoys_touched
FROM expected e
LEFT JOIN job_aliases a ON a.kind = e.kind AND a.backend_job_id = e.backend_job_id
LEFT JOIN jobs j ON j.id = a.job_id
"""


async def fill(dsn: str, jobs: int) -> tuple[int, float]:
    orphans = jobs // 10
    # the prompts are already in normal form: prompt_norm is the prompt itself
    for sample in ("a lost portrait number 12", "a shared still life number 8"):
        assert normalize(sample) == sample
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(GENERATE, jobs, orphans)
        await conn.execute(ORPHANS, orphans)
        await conn.execute("VACUUM ANALYZE")
        total = await conn.fetchval("SELECT count(*) FROM jobs")
        assert total == jobs, (total, jobs)
    finally:
        await conn.close()
    return orphans, time.perf_counter() - started


def run_reconcile(
    dsn: str, log_path: Path, profile: Path | None = None,
    command: tuple[str, ...] = ("run", "--json"),
) -> tuple[float, int, dict[str, Any], int, float]:
    """`python -m reconcile run --json` (or another `command`): (seconds, peak RSS in KiB,
    its JSON, exit code, CPU seconds of the process); with `profile`, py-spy records the
    run there."""
    env = gateway_env(dsn, 0)
    env.pop("PORT")
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "reconcile", *command],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log)
        assert proc.stdout is not None
        spy = None
        if profile is not None:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(proc.pid), "--rate", "200", "--format", "raw", "--output", str(profile),
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if spy is not None:
        spy.wait(timeout=60)
    data = json.loads(output) if output.strip() else {}
    return seconds, usage.ru_maxrss, data, proc.returncode, usage.ru_utime + usage.ru_stime


async def check(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(CHECK)
    finally:
        await conn.close()
    assert row is not None
    found = dict(row)
    ok = (found["matched_right"] == found["should_match"]
          and found["left_alone"] == found["should_wait"]
          and found["aliases"] == found["should_match"]
          and found["decoys_touched"] == 0)
    return {**found, "ok": ok}


async def run(args: argparse.Namespace, out: Path) -> tuple[list[Figure], dict[str, Any]]:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    detail: dict[str, Any] = {"sizes": []}
    for jobs in sizes:
        async with scratch_database("reconcile") as dsn:
            print(f"reconcile: filling {jobs:,} jobs", flush=True)
            orphans, fill_seconds = await fill(dsn, jobs)
            load = wait_for_quiet(args.quiet_load, args.quiet_wait)
            print(f"reconcile: load {load[0]:.2f}; sorami-reconcile run on {jobs:,} jobs, "
                  f"{orphans:,} orphans", flush=True)
            profile = out / f"profile-reconcile-{jobs}.txt" if args.profile else None
            seconds, rss_kib, result, code, cpu = run_reconcile(
                dsn, out / f"reconcile-{jobs}.log", profile)
            correctness = await check(dsn)
        entry = {
            "jobs": jobs,
            "orphans": orphans,
            "fill_seconds": round(fill_seconds, 1),
            "load_before": load,
            "seconds": round(seconds, 2),
            "run_duration_seconds": result.get("duration_seconds"),
            "peak_rss_mib": round(rss_kib / 1024, 1),
            # the reconcile process's own CPU (the rest of the time is the database's)
            "process_cpu_seconds": round(cpu, 2),
            "ms_per_orphan": round(seconds / orphans * 1000, 4),
            "exit_code": code,
            "counts": result.get("counts"),
            "state": result.get("state"),
            "correctness": correctness,
        }
        detail["sizes"].append(entry)
        print(f"reconcile: {jobs:,} jobs: {seconds:.1f} s (process CPU {cpu:.1f} s), "
              f"peak RSS {rss_kib / 1024:.0f} MiB, "
              f"{entry['ms_per_orphan']:.3f} ms per orphan, exit {code}; matches "
              f"{'right' if correctness['ok'] else 'WRONG'} ({correctness})", flush=True)
    return figures(detail), detail


def figures(detail: dict[str, Any]) -> list[Figure]:
    found: list[Figure] = []
    by_size = {e["jobs"]: e for e in detail["sizes"]}
    for e in detail["sizes"]:
        label = f"{e['jobs']:,} jobs"
        big = e["jobs"] >= 1_000_000
        found.append(Figure("reconcile", f"{label}: seconds", e["seconds"], "s",
                            target="<= 30 s" if big else "",
                            met=(e["seconds"] <= 30) if big else None,
                            note=f"{e['orphans']:,} orphans, exit {e['exit_code']}"))
        found.append(Figure("reconcile", f"{label}: peak RSS", e["peak_rss_mib"], "MiB",
                            target="<= 300 MB" if big else "",
                            met=(e["peak_rss_mib"] * 1.048576 <= 300) if big else None))
    if 100_000 in by_size and 1_000_000 in by_size:
        small, big_run = by_size[100_000], by_size[1_000_000]
        ratio = big_run["ms_per_orphan"] / small["ms_per_orphan"]
        found.append(Figure("reconcile", "time per orphan, 1M vs 100k",
                            big_run["ms_per_orphan"], "ms", small["ms_per_orphan"], ratio,
                            "<= 1.5x", ratio <= 1.5))
    correct = all(e["correctness"]["ok"] and e["exit_code"] == 0 for e in detail["sizes"])
    found.append(Figure("reconcile", "matches", "all right" if correct else "WRONG",
                        target="every match on its job, no doubt linked", met=correct))
    return found
