"""`sorami-reconcile import-legacy` at scale: a legacy database built from the existing app's
`init.sql`, filled in SQL (generate_series) with `--generations` generations (half images,
half videos), two files and one notification each, 10,000 users, and one generation in a
thousand the old webhook's damage (a backend UUID on the first user, a backend-direct
notification, the stuck twin of its real owner among the others).

Measured: the import's wall time and peak RSS (wait4 of the process), beside the time
PostgreSQL takes to COPY the same rows out of the legacy database and into an empty copy of
its schema; afterwards the gateway holds every job, file and notification it should.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import scratch_database, wait_for_quiet
from bench.reconcile import run_reconcile
from bench.report import Figure
from gateway.store.legacy_source import init_sql

USERS = 10_000
# one damaged row per DAMAGE_EVERY generations: its twin is generation k - 1's author's
DAMAGE_EVERY = 1000

FILL_USERS = """
INSERT INTO users (id, "clerkId", email, "createdAt", "updatedAt")
SELECT 'cu' || lpad(i::text, 23, '0'), 'user_' || i, 'u' || i || '@example.com',
       timestamp '2025-01-01' + i * interval '1 second', timestamp '2025-01-01'
FROM generate_series(0, $1 - 1) AS i
"""

FILL = """
WITH params AS (SELECT $1::int AS n, timestamp '2026-01-01' AS t0)
INSERT INTO {kind}_generations (id, prompt, "authorId", status, progress, "createdAt",
                                "updatedAt", "completedAt")
SELECT CASE WHEN k % {every} = {every} - 1
            THEN '00000000-0000-4000-{variant}000-' || lpad(k::text, 12, '0')
            ELSE 'c{tag}' || lpad(k::text, 23, '0') END,
       'a prompt number ' || (k - (k % {every} = {every} - 1)::int),
       'cu' || lpad((CASE WHEN k % {every} = {every} - 1 THEN 0
                          ELSE 1 + k % ({users} - 1) END)::text, 23, '0'),
       (CASE WHEN k % {every} = {every} - 2 THEN 'PENDING' ELSE 'COMPLETED' END)::"{enum}",
       CASE WHEN k % {every} = {every} - 2 THEN 0 ELSE 100 END,
       p.t0 + k * interval '1 second', p.t0 + k * interval '1 second',
       CASE WHEN k % {every} <> {every} - 2 THEN p.t0 + k * interval '1 second' END
FROM params p, generate_series(0, p.n - 1) AS k
"""

FILES = """
INSERT INTO {kind}_files (id, "generationId", filename, "s3Key", "fileUrl", "fileSize", format,
                          width, height, "aspectRatio", metadata, "createdAt")
SELECT g.id || '-' || i, g.id, i || '.png', '{kind}/' || g.id || '/' || i,
       'https://cdn.example/{kind}/' || g.id || '/' || i, 1000, 'PNG',
       CASE WHEN i = 0 THEN 1024 END, CASE WHEN i = 0 THEN 1024 END, '1024x1024',
       jsonb_build_object('description', g.prompt), g."createdAt"
FROM {kind}_generations g, generate_series(0, 1) AS i
WHERE g.status = 'COMPLETED'
"""

NOTIFICATIONS = """
INSERT INTO notifications (id, "userId", type, title, message, metadata, read, "createdAt")
SELECT 'cn' || g.id, g."authorId", '{label}_COMPLETED', 'Ready', 'Your files are ready',
       CASE WHEN g.id LIKE '00000000-%'
            THEN jsonb_build_object('generationId', g.id, 'source', 'backend-direct')
            ELSE jsonb_build_object('generationId', g.id) END,
       (hashtext(g.id) % 2 = 0), g."createdAt"
FROM {kind}_generations g
"""

TABLES = ("users", "image_generations", "image_files", "video_generations", "video_files",
          "notifications")


async def fill(dsn: str, generations: int) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(init_sql())
        await conn.execute(FILL_USERS, USERS)
        for kind, tag, enum in (("image", "i", "ImageJobStatus"),
                                ("video", "v", "VideoJobStatus")):
            statement = FILL.format(kind=kind, tag=tag, enum=enum, users=USERS,
                                    every=DAMAGE_EVERY, variant="a" if kind == "image" else "b")
            await conn.execute(statement, generations // 2)
            await conn.execute(FILES.format(kind=kind))
            await conn.execute(NOTIFICATIONS.format(kind=kind, label=kind.upper()))
        await conn.execute("VACUUM ANALYZE")
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
    finally:
        await conn.close()


async def copy_baseline(source: str, target: str, out: Path) -> float:
    """Seconds PostgreSQL takes to COPY the users, generation, file and notification tables out of
    the legacy database and into an empty copy of its schema (through a file)."""
    dst = await asyncpg.connect(target)
    src = await asyncpg.connect(source)
    try:
        await dst.execute(init_sql())
        started = time.perf_counter()
        for table in TABLES:
            path = out / f"copy-{table}.bin"
            await src.copy_from_table(table, output=str(path), format="binary")
            await dst.copy_to_table(table, source=str(path), format="binary")
            path.unlink()
        return time.perf_counter() - started
    finally:
        await src.close()
        await dst.close()


CHECK = """
SELECT (SELECT count(*) FROM jobs) AS jobs,
       (SELECT count(*) FROM job_files) AS files,
       (SELECT count(*) FROM notifications) AS notifications,
       (SELECT count(*) FROM orphans) AS orphans,
       (SELECT count(*) FROM outbox) AS outbox
"""


async def run(args: argparse.Namespace, out: Path) -> tuple[list[Figure], dict[str, Any]]:
    n = args.generations
    async with scratch_database("legacy", migrated=False) as legacy, \
            scratch_database("legacy_copy", migrated=False) as copy, \
            scratch_database("import") as gateway:
        started = time.perf_counter()
        rows = await fill(legacy, n)
        filled = time.perf_counter() - started
        print(f"import: legacy database filled in {filled:.0f} s: {rows}", flush=True)
        copy_seconds = await copy_baseline(legacy, copy, out)
        load = wait_for_quiet(args.quiet_load, args.quiet_wait)
        seconds, rss_kib, report, code, cpu = await asyncio.to_thread(
            run_reconcile, gateway, out / "import.log", None,
            ("import-legacy", "--from", legacy, "--json"))
        conn = await asyncpg.connect(gateway)
        try:
            found = dict(await conn.fetchrow(CHECK) or {})
        finally:
            await conn.close()
    damaged = rows["image_generations"] // DAMAGE_EVERY + rows["video_generations"] // \
        DAMAGE_EVERY
    expected = {"jobs": rows["image_generations"] + rows["video_generations"] - damaged,
                "orphans": damaged, "outbox": 0,
                "notifications": rows["notifications"] - damaged}
    correct = code == 0 and all(found[k] == v for k, v in expected.items())
    rss_mib = rss_kib / 1024
    note = (f"{rows['image_generations'] + rows['video_generations']:,} generations, "
            f"{rows['image_files'] + rows['video_files']:,} files, "
            f"{rows['notifications']:,} notifications; load before {load}; "
            f"{'all rows where expected' if correct else f'WRONG: {found} vs {expected}'}")
    figures = [
        Figure("import", "import-legacy wall time", round(seconds, 1), "s",
               limit=round(copy_seconds, 1), ratio=round(seconds / copy_seconds, 2),
               target="<= 180 s", met=correct and seconds <= 180, note=note),
        Figure("import", "import-legacy peak RSS", round(rss_mib), "MiB", target="<= 300 MiB",
               met=rss_mib <= 300),
    ]
    detail = {"rows": rows, "found": found, "expected": expected, "seconds": seconds,
              "copy_seconds": copy_seconds, "cpu_seconds": cpu, "rss_kib": rss_kib,
              "exit_code": code, "report_kinds": report.get("kinds"), "load_before": load}
    return figures, detail
