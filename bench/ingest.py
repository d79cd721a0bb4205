"""Webhook ingest: pre-signed webhooks against `serve --workers N` (`--workers`, default 1),
beside pgbench running the gateway's own per-webhook SQL on the same preloaded jobs, at the
same concurrency.

Each repetition uses jobs of its own (none touched before): W jobs get a progress webhook
(`generating`, 50 %) and then a completion with 2 files, and a quarter of those deliveries
are sent again (20 % of all requests are duplicates). A job's completion is sent 64 requests
after its progress, and never before the progress is answered (as the backend sends them);
a repeated completion waits for that answer too (a sender retries only what it sent), so
nothing is stale: the database must then hold exactly
W completed jobs, 2W events, 2W files, W notifications, 2W dedupe rows.

pgbench runs the same statement per webhook (INGEST, or on completion INGEST_FINISHED with the
files and the owner's notification: one statement, its own transaction, as in the gateway),
with the parameters the gateway binds for the same payloads, in the same mix: per client,
per 5 webhooks, progress and completion of one job, the same of another, and a duplicate of
the last completion (its key taken already). Once more after those two runs, pgbench runs the
same statements less their NOTIFY: every job change NOTIFYs its live listeners, PostgreSQL
commits NOTIFYing transactions one at a time, and that run shows what this costs the limit.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from bench import pgbench
from bench.common import (
    JOB_ID_BASE,
    Server,
    batch_sizes,
    batches_text,
    batching_env,
    children_cpu_seconds,
    cpu_budget,
    cpu_split,
    free_port,
    gateway_env,
    median,
    new_webhook_secret,
    postgres_cpu_seconds,
    profiled,
    scratch_database,
    span,
    wait_for_quiet,
)
from bench.load import raw_request, replay, write_requests
from bench.report import Figure
from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode
from gateway.store import jobs as store_jobs
from gateway.store import webhooks as store_webhooks
from gateway.webhooks.signing import signature_headers

CONNECTIONS = 32
# a completion is sent this many requests after its job's progress
CHUNK = 64
USERS = 1000

PRELOAD = """
INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, params, status, message,
                  created_at, updated_at)
SELECT ($1::bigint + i)::text, 'image', 'user_' || (i % $3),
       'a red fox in the snow, number ' || i, 'a red fox in the snow, number ' || i,
       '{"num_images": 2, "size": "1024x1024", "format": "PNG"}', 'QUEUED',
       'Sent to the generator.', now() - interval '2 minutes', now() - interval '2 minutes'
FROM generate_series(0, $2 - 1) AS i
"""


async def preload(conn: asyncpg.Connection, count: int) -> float:
    started = time.perf_counter()
    await conn.execute(PRELOAD, JOB_ID_BASE, count, USERS)
    await conn.execute("VACUUM ANALYZE jobs")
    return time.perf_counter() - started


def job_id(index: int) -> str:
    return str(JOB_ID_BASE + index)


def user_of(index: int) -> str:
    return f"user_{index % USERS}"


def progress_payload(index: int) -> dict[str, Any]:
    return {
        "job_id": job_id(index),
        "status": "generating",
        "progress": 50,
        "message": "Generating images",
        "user_id": user_of(index),
        "original_prompt": f"a red fox in the snow, number {index}",
        "timestamp": "2026-11-21T23:00:00Z",
    }


def completed_payload(index: int) -> dict[str, Any]:
    files = [
        {
            "url": f"https://cdn.sorami.example/images/{job_id(index)}/{n}.png",
            "file_path": f"images/{job_id(index)}/{n}.png",
            "description": f"a red fox in the snow, number {index}",
            "format": "png",
            "size_bytes": 1_482_113 + n,
            "dimensions": "1024x1024",
        }
        for n in range(2)
    ]
    return {
        "job_id": job_id(index),
        "status": "completed",
        "progress": 100,
        "message": "Images generated",
        "user_id": user_of(index),
        "original_prompt": f"a red fox in the snow, number {index}",
        "timestamp": "2026-11-21T23:00:30Z",
        "data": {
            "images": files,
            "metadata": {"model_name": "gemini-2.5-flash-image", "generation_time_seconds": 12.5},
        },
    }


def _signed(body: bytes, key: bytes, msg_id: str, timestamp: int) -> dict[str, str]:
    return {"Content-Type": "application/json",
            **signature_headers(key, msg_id, timestamp, body)}


def build_stream(
    rep: int, first_job: int, jobs: int, key: bytes, port: int, seed: int
) -> tuple[list[bytes], list[int], int]:
    """The signed requests in sending order; for each, the index of the request that must be
    answered before it is sent (a completion waits for its job's progress; -1: none); and how
    many of the requests are duplicates."""
    rng = random.Random(seed)
    route = "/api/webhooks/image-completion"
    now = int(time.time())
    # (order key, request, key of the request that must be answered first)
    items: list[tuple[float, bytes, float]] = []
    for start in range(first_job, first_job + jobs, CHUNK):
        chunk = range(start, min(start + CHUNK, first_job + jobs))
        base = float(len(items))
        for n, i in enumerate(chunk):
            body = msgspec.json.encode(progress_payload(i))
            headers = _signed(body, key, f"msg_{rep}_{i}_p", now)
            items.append((base + n, raw_request("POST", route, port, headers, body), -1.0))
        for n, i in enumerate(chunk):
            body = msgspec.json.encode(completed_payload(i))
            headers = _signed(body, key, f"msg_{rep}_{i}_c", now)
            items.append((base + len(chunk) + n, raw_request("POST", route, port, headers, body),
                          base + n))
    # a quarter of the deliveries again (a fifth of all requests), each some time after the
    # first copy, as a sender's retry would come, and after what the first copy waited for
    # (else a repeated completion could overtake its job's progress, which is then stale)
    picked = rng.sample(range(len(items)), len(items) // 4)
    items += [(items[n][0] + rng.uniform(1, 2000), items[n][1], items[n][2]) for n in picked]
    items.sort(key=lambda item: item[0])
    position = {order: n for n, (order, _, _) in enumerate(items)}
    after = [position[first] if first >= 0 else -1 for _, _, first in items]
    return [raw for _, raw, _ in items], after, len(picked)


# --- pgbench: the same statements, from the gateway's constants --------------------------------


def _array(values: list[Any]) -> str:
    """A PostgreSQL array literal of `values` (NULL for None)."""
    def item(v: Any) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, int | float):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "{" + ",".join(item(v) for v in values) + "}"


def gateway_arguments(payload: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """The statement the gateway runs for `payload` and the parameters it binds."""
    body = msgspec.json.encode(payload)
    delivery = store_webhooks.Delivery(Kind.IMAGE, "id:bench", decode(body), body)
    statement, args, _ = store_webhooks.ingest_statement(delivery)
    return statement, args


def _literal(value: Any) -> str:
    """A gateway parameter as a pgbench variable's text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return _array(list(value))
    if isinstance(value, dict):
        return msgspec.json.encode(value).decode()
    return str(value)


def _bound(
    prefix: str, payload: dict[str, Any], notify: bool = True
) -> tuple[str, dict[str, str]]:
    """The gateway's statement for `payload` with the job and the key as the script's
    variables, every other parameter a variable holding the gateway's own value (NULL in
    place, pgbench variables cannot be NULL); and those variables. Without `notify`, the
    statement's NOTIFY is left out and nothing else changes."""
    statement, args = gateway_arguments(payload)
    if not notify:
        statement = statement.replace(store_jobs.NOTIFY_CALL, "NULL::void")
        if "pg_notify" in statement:
            raise ValueError("the ingest statement NOTIFYs otherwise than NOTIFY_CALL")
    params: dict[int, str] = {}
    variables: dict[str, str] = {}
    for n, value in enumerate(args, start=1):
        if n == 1:  # the job_id the webhook names
            params[n] = ":job"
        elif value == "id:bench":
            params[n] = ":key"
        elif value is None:
            params[n] = "NULL"
        else:
            params[n] = f":{prefix}{n}"
            variables[f"{prefix}{n}"] = _literal(value)
    return pgbench.bind(statement, params), variables


def pgbench_script(notify: bool = True) -> str:
    """One webhook per run of the script. Without `notify`: the same statements less their
    NOTIFY, to show what PostgreSQL's serialized commits of NOTIFYing transactions cost."""
    progress, _ = _bound("p", progress_payload(0), notify)
    completion, _ = _bound("c", completed_payload(0), notify)
    return "\n".join([
        "-- one webhook per script; n counts this client's webhooks",
        r"\set t :n % 5",
        r"\set g :n / 5",
        r"\set job :jobbase + 2 * (:g * :clients + :client_id)",
        r"\set key :keybase + :client_id * 100000000 + :n",
        r"\if :t >= 2",
        r"\set job :job + 1",
        r"\endif",
        r"\if :t % 2 = 0 and :t < 4",
        "-- progress",
        progress,
        r"\else",
        r"\if :t = 4",
        "-- a duplicate of the completion just before: the key is taken",
        r"\set key :key - 1",
        r"\endif",
        "-- completion with its files and the owner's notification",
        completion,
        r"\endif",
        r"\set n :n + 1",
        "",
    ])


def pgbench_variables(jobbase: int, keybase: int) -> dict[str, str | int]:
    """The values the gateway binds, taken from decoding the same payloads it receives (the
    job's id and the key aside, the same for every job)."""
    variables: dict[str, str | int] = {
        "n": 0,
        "clients": CONNECTIONS,
        "jobbase": jobbase,
        "keybase": keybase,
    }
    variables.update(_bound("p", progress_payload(0))[1])
    variables.update(_bound("c", completed_payload(0))[1])
    return variables


# --- checks --------------------------------------------------------------------------------------

EFFECTS = """
SELECT
  (SELECT count(*) FROM jobs WHERE id = ANY($1::text[])
     AND status = 'COMPLETED' AND progress = 100 AND seq = 3
     AND first_webhook_at IS NOT NULL AND finished_at IS NOT NULL) AS completed,
  (SELECT count(*) FROM job_events WHERE job_id = ANY($1::text[])) AS events,
  (SELECT count(*) FROM job_files WHERE job_id = ANY($1::text[])) AS files,
  (SELECT count(*) FROM notifications WHERE job_id = ANY($1::text[])) AS notifications,
  (SELECT count(*) FROM webhook_deliveries WHERE dedupe_key LIKE $2) AS dedupe_rows,
  (SELECT count(*) FROM webhook_deliveries WHERE dedupe_key LIKE $2
     AND outcome = 'applied') AS dedupe_applied,
  (SELECT count(*) FROM orphans) AS orphans
"""

PGBENCH_CLAIMS = """
SELECT count(*) FROM webhook_deliveries
WHERE dedupe_key ~ '^[0-9]+$' AND dedupe_key::bigint BETWEEN $1 AND $1 + 99999999999
"""


async def check_effects(
    conn: asyncpg.Connection, rep: int, first_job: int, jobs: int
) -> dict[str, Any]:
    ids = [job_id(i) for i in range(first_job, first_job + jobs)]
    row = await conn.fetchrow(EFFECTS, ids, f"id:msg\\_{rep}\\_%")
    assert row is not None
    found = dict(row)
    expected = {"completed": jobs, "events": 2 * jobs, "files": 2 * jobs,
                "notifications": jobs, "dedupe_rows": 2 * jobs, "dedupe_applied": 2 * jobs,
                "orphans": 0}
    wrong = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    return {"expected": expected, "found": found, "ok": not wrong, "mismatches": wrong}


# --- one repetition ------------------------------------------------------------------------------




async def run(args: argparse.Namespace, out: Path) -> tuple[list[Figure], dict[str, Any]]:
    webhook_jobs: int = args.ingest_jobs
    repeats: int = args.repeat
    requests_total = math.ceil(webhook_jobs * 2.5)
    # pgbench runs before and after the gateway, each half as many transactions, then once
    # more as many without the NOTIFY
    per_client = math.ceil(requests_total / CONNECTIONS / 2)
    pg_jobs = 2 * CONNECTIONS * math.ceil(per_client / 5)
    stride = webhook_jobs + 3 * pg_jobs
    preload_count = max(args.preload, stride * repeats)
    detail: dict[str, Any] = {"server": "bare" if args.bare else "gateway",
                              "batch_max": args.batch_max,
                              "preloaded_jobs": preload_count, "webhook_jobs": webhook_jobs,
                              "connections": CONNECTIONS, "repetitions": []}
    secret, key = new_webhook_secret()
    hs_secret = "bench-" + "x" * 40
    async with scratch_database("ingest") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            print(f"ingest: preloading {preload_count:,} jobs", flush=True)
            detail["preload_seconds"] = round(await preload(conn, preload_count), 1)
            script = pgbench_script()
            quiet_script = pgbench_script(notify=False)
            (out / "ingest-pgbench.sql").write_text(script)
            (out / "ingest-pgbench-without-notify.sql").write_text(quiet_script)
            for rep in range(repeats):
                load = wait_for_quiet(args.quiet_load, args.quiet_wait)
                first_job = rep * stride
                print(f"ingest #{rep + 1}: load {load[0]:.2f}; pgbench, {CONNECTIONS} clients, "
                      f"2 x {per_client * CONNECTIONS:,} transactions, before and after the "
                      f"gateway", flush=True)

                async def limit_run(slot: int, rep: int = rep, first_job: int = first_job,
                                    script: str = script
                                    ) -> tuple[pgbench.PgbenchResult, int, float, float]:
                    # slot 0: before the gateway, 1: after it, 2: without the NOTIFY
                    keybase = (3 * rep + slot + 1) * 10**12
                    jobbase = JOB_ID_BASE + first_job + webhook_jobs + slot * pg_jobs
                    pg_before, own_before = postgres_cpu_seconds(), children_cpu_seconds()
                    result = pgbench.run(dsn, script, clients=CONNECTIONS,
                                         transactions_per_client=per_client,
                                         variables=pgbench_variables(jobbase, keybase))
                    pg_used = postgres_cpu_seconds() - pg_before
                    own_used = children_cpu_seconds() - own_before
                    claims = await conn.fetchval(PGBENCH_CLAIMS, keybase)
                    return result, claims, pg_used, own_used

                before, claims_before, pg_cpu_limit, pgbench_cpu = await limit_run(0)
                port = free_port()
                stream, after, duplicates = build_stream(rep, first_job, webhook_jobs, key,
                                                         port, seed=rep)
                stream_path = out / f"ingest-stream-{rep}.bin"
                write_requests(stream_path, stream, after)
                env = gateway_env(dsn, port, WEBHOOK_SECRETS=secret, AUTH_HS256_SECRET=hs_secret,
                                  **batching_env(args.batch_max))
                if args.bare:
                    server = Server([], env, out / f"ingest-server-{rep}.log",
                                    module="bench.bare_server")
                else:
                    server = Server(["serve", "--workers", str(args.workers), "--no-migrate"],
                                    env, out / f"ingest-server-{rep}.log")
                try:
                    await server.wait_ready()
                    pids = server.pids()
                    cpu_before = {pid: cpu_split(pid) for pid in pids}
                    pg_cpu_before = postgres_cpu_seconds()
                    print(f"ingest #{rep + 1}: sending {len(stream):,} webhooks "
                          f"({duplicates:,} duplicates) over {CONNECTIONS} connections",
                          flush=True)
                    with profiled(pids, out, args.profile_seconds, args.profile and rep == 0):
                        gateway = replay(stream_path, port, connections=CONNECTIONS)
                    gateway_system = sum(cpu_split(pid)[1] - cpu_before[pid][1] for pid in pids)
                    gateway_cpu = sum(sum(cpu_split(pid)) - sum(cpu_before[pid]) for pid in pids)
                    pg_cpu = postgres_cpu_seconds() - pg_cpu_before
                    batches = {} if args.bare else batch_sizes(port).get("webhook", {})
                finally:
                    server.stop()
                after_run, claims_after, pg_cpu_after, pgbench_cpu_after = await limit_run(1)
                quiet, claims_quiet, _, _ = await limit_run(2, script=quiet_script)
                pg_cpu_limit += pg_cpu_after
                pgbench_cpu += pgbench_cpu_after
                limit = pgbench.combine([before, after_run])
                claims = claims_before + claims_after
                claims_per_run = CONNECTIONS * sum(1 for n in range(per_client) if n % 5 != 4)
                expected_claims = 2 * claims_per_run
                effects = await check_effects(conn, rep, first_job, webhook_jobs)
                outcomes_ok = (
                    gateway.outcomes.get("applied", 0) == 2 * webhook_jobs
                    and gateway.outcomes.get("duplicate", 0) == duplicates
                    and sum(gateway.outcomes.values()) == 2 * webhook_jobs + duplicates
                )
                stream_path.unlink()
                errors = gateway.error_count(ok_statuses=(200,))
                rep_detail = {
                    "load_before": load,
                    "gateway": {**gateway.as_dict(), "errors": errors},
                    "gateway_cpu_seconds": round(gateway_cpu, 2),
                    "gateway_system_cpu_seconds": round(gateway_system, 2),
                    "postgres_cpu_seconds": round(pg_cpu, 2),
                    # the same number of webhooks through pgbench (both its runs)
                    "pgbench_postgres_cpu_seconds": round(pg_cpu_limit, 2),
                    "pgbench_cpu_seconds": round(pgbench_cpu, 2),
                    "duplicates_sent": duplicates,
                    "pgbench": limit.as_dict(),
                    "pgbench_claims": {"found": claims, "expected": expected_claims,
                                       "ok": claims == expected_claims},
                    # the same statements less their NOTIFY, once, as many as either run
                    "pgbench_without_notify": {
                        **quiet.as_dict(),
                        "claims": {"found": claims_quiet, "expected": claims_per_run,
                                   "ok": claims_quiet == claims_per_run},
                    },
                    "ratio": gateway.throughput / limit.tps,
                    "batches": batches,
                    "effects": effects,
                    "outcomes_ok": outcomes_ok,
                }
                detail["repetitions"].append(rep_detail)
                print(f"ingest #{rep + 1}: {detail['server']} {gateway.throughput:,.0f}/s "
                      f"p50 {gateway.p50_ms:.1f} ms p99 {gateway.p99_ms:.1f} ms "
                      f"errors {errors}; pgbench {limit.tps:,.0f}/s "
                      f"p50 {limit.p50_ms:.1f} ms p99 {limit.p99_ms:.1f} ms; "
                      f"ratio {gateway.throughput / limit.tps:.2f}; effects "
                      f"{'ok' if effects['ok'] and outcomes_ok else 'WRONG'}; CPU s: server "
                      f"{gateway_cpu:.1f} (system {gateway_system:.1f}), postgres {pg_cpu:.1f}, "
                      f"sender {gateway.sender_cpu_seconds:.1f}; the same through pgbench: "
                      f"postgres {pg_cpu_limit:.1f}, pgbench {pgbench_cpu:.1f}; pgbench less "
                      f"the NOTIFY {quiet.tps:,.0f}/s p99 {quiet.p99_ms:.1f} ms; "
                      f"{batches_text(batches, 'webhooks')}", flush=True)
        finally:
            await conn.close()
    return figures(detail), detail


def figures(detail: dict[str, Any]) -> list[Figure]:
    reps = detail["repetitions"]
    name = "ingest" if detail.get("server", "gateway") == "gateway" else "ingest (bare)"
    ratios = [r["ratio"] for r in reps]
    # the median repetition (by ratio) gives the row; the range of all is in the note
    mid = sorted(reps, key=lambda r: r["ratio"])[len(reps) // 2]
    gw, pg = mid["gateway"], mid["pgbench"]
    p99s = [r["gateway"]["p99_ms"] for r in reps]
    errors = sum(r["gateway"]["errors"] for r in reps)
    effects_ok = all(r["effects"]["ok"] and r["outcomes_ok"] for r in reps)
    limit_ok = all(r["pgbench_claims"]["ok"] and r["pgbench_without_notify"]["claims"]["ok"]
                   for r in reps)
    quiet = [r["pgbench_without_notify"] for r in reps]
    quiet_note = (f"; pgbench less the NOTIFY: {span([q['tps'] for q in quiet], '/s', 0)}, "
                  f"p99 {span([q['p99_ms'] for q in quiet], ' ms', 1)}")
    # group commit may beat pgbench's one transaction per webhook; without it, 0.75 of it
    grouped = detail.get("batch_max") is None or detail["batch_max"] > 1
    floor = 1.5 if grouped and name == "ingest" else 0.75
    means = [r["batches"]["mean"] for r in reps if r.get("batches")]
    batch_note = f"; webhooks per transaction {span(means, '', 1)}" if means else ""
    budget = cpu_budget({"server": mid["gateway_cpu_seconds"],
                         "PostgreSQL": mid["postgres_cpu_seconds"],
                         "sender": gw["sender_cpu_seconds"]},
                        gw["sent"], pg["tps"], floor, "webhook")
    return [
        Figure(name, "webhooks/s", gw["throughput"], "/s", pg["tps"], median(ratios),
               f">= {floor}", median(ratios) >= floor,
               note=f"ratio {span(ratios)} over {len(reps)} runs{quiet_note}{batch_note}; "
                    f"median run: {budget}"),
        Figure(name, "p50 latency", gw["p50_ms"], "ms", pg["p50_ms"],
               gw["p50_ms"] / pg["p50_ms"]),
        Figure(name, "p99 latency", gw["p99_ms"], "ms", pg["p99_ms"],
               gw["p99_ms"] / pg["p99_ms"], "<= 30 ms", max(p99s) <= 30,
               note=f"p99 {span(p99s, ' ms', 1)} over {len(reps)} runs; "
                    f"pgbench's own {span([r['pgbench']['p99_ms'] for r in reps], ' ms', 1)}"),
        Figure(name, "errors", errors, "", sum(r["pgbench"]["failed"] for r in reps),
               None, "0", errors == 0),
        Figure(name, "effects in the database", "exact" if effects_ok else "WRONG",
               target="exact", met=effects_ok,
               note="pgbench's own claims " + ("as expected" if limit_ok else "WRONG")),
    ]

