"""The review console's list at scale: `GET /api/review/orphans` on 100,000 orphans.

A fresh database is filled in SQL: `--review-orphans` orphans (default 100,000) first seen
over a week, 40 % of them open (unresolved or unmatched), the rest matched, assigned or
dismissed; each with one completion event carrying an image URL and one decision (the open
ones ambiguous or without a candidate). Half name a user (5,000 users). One `serve` process
answers an operator's requests one after another: the first page, the pages after it by
cursor, and the list filtered by kind, by user and by prompt text. Measured: the latency of
every request, its p50 and p99 against the 50 ms target.
"""

from __future__ import annotations

import argparse
import random
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt

from bench.common import (
    Server,
    free_port,
    gateway_env,
    new_webhook_secret,
    percentile,
    scratch_database,
    wait_for_quiet,
)
from bench.report import Figure

OPERATOR = "op_bench"
TARGET_P99_MS = 50.0

FILL = """
WITH o AS (
    SELECT k, CASE WHEN k % 2 = 0 THEN 'image' ELSE 'video' END AS kind,
           'bk-' || k AS backend_job_id,
           CASE WHEN k % 10 < 2 THEN 'unresolved' WHEN k % 10 < 4 THEN 'unmatched'
                WHEN k % 10 < 6 THEN 'matched' WHEN k % 10 < 8 THEN 'assigned'
                ELSE 'dismissed' END AS state,
           CASE WHEN k % 2 = 0 THEN 'user_' || (k % 5000) END AS user_id,
           'a lost portrait number ' || k AS prompt,
           now() - interval '7 days' + k * ($1::float8 / $2) * interval '1 second' AS seen
    FROM generate_series(0, $2 - 1) AS k
), ins AS (
    INSERT INTO orphans (kind, backend_job_id, state, user_id, prompt, prompt_norm, file_count,
                         event_count, first_seen_at, last_seen_at, resolved_at)
    SELECT kind::job_kind, backend_job_id, state, user_id, prompt, prompt, 1, 1, seen, seen,
           CASE WHEN state NOT IN ('unresolved', 'unmatched') THEN seen END
    FROM o
    RETURNING kind, backend_job_id, first_seen_at, state
), ev AS (
    INSERT INTO orphan_events (kind, backend_job_id, dedupe_key, event_status, payload,
                               received_at)
    SELECT kind, backend_job_id, 'bench-' || backend_job_id || '-' || kind, 'completed',
           jsonb_build_object('job_id', backend_job_id, 'status', 'completed',
               'data', jsonb_build_object(kind::text || 's', jsonb_build_array(
                   jsonb_build_object('url', 'https://files.example/' || backend_job_id,
                                      'format', 'PNG', 'dimensions', '1024x1024')))),
           first_seen_at
    FROM ins
)
INSERT INTO reconcile_decisions (kind, backend_job_id, rule, outcome, evidence, created_at)
SELECT kind, backend_job_id,
       CASE WHEN state IN ('unresolved', 'unmatched') THEN 'prompt_only' ELSE 'operator' END,
       CASE WHEN state IN ('unresolved', 'unmatched')
            THEN (CASE WHEN length(backend_job_id) % 2 = 0 THEN 'ambiguous'
                       ELSE 'no_candidate' END)
            WHEN state = 'dismissed' THEN 'dismissed' ELSE 'assigned' END,
       jsonb_build_object('reason', 'bench'), first_seen_at + interval '1 minute'
FROM ins
"""


async def _fill(url: str, orphans: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(FILL, 7 * 86400.0, orphans)
        # as autovacuum leaves a table at rest: the fill updated every orphan once (its
        # review reason), and a bulk load's pages are not yet marked all-visible
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()


async def _measure(base: str, token: str, requests: int) -> dict[str, list[float]]:
    """Latencies (ms) by request shape, one request at a time, as an operator clicks."""
    rng = random.Random(7)
    timings: dict[str, list[float]] = {"first": [], "next": [], "kind": [], "user": [], "q": []}
    headers = {"Authorization": f"Bearer {token}"}
    cursor: str | None = None
    async with aiohttp.ClientSession(headers=headers) as session:

        async def get(shape: str, params: dict[str, Any]) -> dict[str, Any]:
            started = time.perf_counter()
            async with session.get(f"{base}/api/review/orphans", params=params) as answer:
                body: dict[str, Any] = await answer.json()
                if answer.status != 200:
                    raise RuntimeError(f"review list answered {answer.status}: {body}")
            timings[shape].append((time.perf_counter() - started) * 1000)
            return body

        for n in range(requests):
            step = n % 5
            if step == 0:
                cursor = (await get("first", {"limit": 50}))["next_cursor"]
            elif step == 1:
                cursor = (await get("next", {"limit": 50, **({"cursor": cursor} if cursor
                                                             else {})}))["next_cursor"]
            elif step == 2:
                await get("kind", {"kind": rng.choice(["image", "video"]), "limit": 50})
            elif step == 3:
                await get("user", {"user_id": f"user_{rng.randrange(0, 5000, 2)}"})
            else:
                await get("q", {"q": f"Portrait  NUMBER {rng.randrange(100_000)}"})
    return timings


async def run(args: argparse.Namespace, out: Path) -> tuple[list[Figure], dict[str, Any]]:
    orphans = args.review_orphans
    async with scratch_database("review") as url:
        started = time.monotonic()
        await _fill(url, orphans)
        filled = time.monotonic() - started
        secret = secrets.token_urlsafe(32)
        whsec, _ = new_webhook_secret()
        port = free_port()
        env = gateway_env(url, port, AUTH_HS256_SECRET=secret, WEBHOOK_SECRETS=whsec,
                          REVIEW_OPERATORS=OPERATOR)
        server = Server(["serve", "--no-migrate"], env, out / "review-server.log")
        try:
            await server.wait_ready()
            now = int(time.time())
            token = jwt.encode({"sub": OPERATOR, "iat": now, "exp": now + 3600}, secret,
                               algorithm="HS256")
            base = f"http://127.0.0.1:{port}"
            await _measure(base, token, 25)  # warm the pool and the plans
            load = wait_for_quiet(args.quiet_load, args.quiet_wait)
            timings = await _measure(base, token, args.review_requests)
        finally:
            server.stop()
    every = [t for shape in timings.values() for t in shape]
    p50, p99 = percentile(every, 50), percentile(every, 99)
    by_shape = {shape: {"p50": round(percentile(t, 50), 2), "p99": round(percentile(t, 99), 2)}
                for shape, t in timings.items()}
    figure = Figure(
        "review", f"list p99 at {orphans:,} orphans", round(p99, 2), "ms",
        target=f"<= {TARGET_P99_MS:g} ms", met=p99 <= TARGET_P99_MS,
        note=f"p50 {p50:.2f} ms over {len(every)} requests; by shape "
             + ", ".join(f"{s} p99 {v['p99']} ms" for s, v in by_shape.items())
             + f"; load {load[0]:.2f} before",
    )
    detail = {"orphans": orphans, "open": orphans * 4 // 10, "fill_seconds": round(filled, 1),
              "requests": len(every), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
              "by_shape": by_shape, "loadavg_before": load}
    return [figure], detail
