"""Job creation: POST /api/images/generate with HS256 tokens against `serve --workers N`
(`--workers`, default 1), its outbox delivered meanwhile to a fast backend double; beside
pgbench running the gateway's own create call (CREATE_JOB: the job and its outbox row, under
the same per-user limits) at the same concurrency.

Each repetition sends a known number of creations, each once; the database must then hold
exactly that many new jobs, each with its outbox row.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import msgspec

from bench import pgbench
from bench.common import (
    ROOT,
    Server,
    batch_sizes,
    batches_text,
    batching_env,
    cpu_budget,
    cpu_seconds,
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
from gateway.api.jobs import PENDING_MESSAGE, _params
from gateway.api.schemas import REQUEST_TYPES, decode_body
from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.store import owned_jobs

CONNECTIONS = 32
USERS = 100


def request_body(n: int) -> bytes:
    return msgspec.json.encode(
        {"prompt": f"a red fox in the snow, take {n}", "num_images": 2, "size": "1024x1024"}
    )


def user_limits(mode: str, count: int) -> dict[str, str]:
    """The per-user limits of the run: off, or on at a value no user of the run reaches."""
    value = "0" if mode == "off" else str(count + 1)
    return {name: value for name in ("USER_MAX_ACTIVE_IMAGE_JOBS", "USER_MAX_ACTIVE_VIDEO_JOBS",
                                     "USER_MAX_IMAGE_JOBS_PER_HOUR",
                                     "USER_MAX_VIDEO_JOBS_PER_HOUR")}


def tokens(secret: str) -> list[str]:
    now = int(time.time())
    return [
        jwt.encode({"sub": f"user_{u}", "iat": now, "nbf": now, "exp": now + 3600}, secret,
                   algorithm="HS256")
        for u in range(USERS)
    ]


def build_stream(count: int, port: int, secret: str) -> list[bytes]:
    signed = tokens(secret)
    return [
        raw_request("POST", "/api/images/generate", port,
                    {"Content-Type": "application/json",
                     "Authorization": f"Bearer {signed[n % USERS]}"},
                    request_body(n))
        for n in range(count)
    ]


def pgbench_script(mode: str, count: int) -> str:
    """The gateway's create call, with the run's limits, for the run's users in turn."""
    limit = user_limits(mode, count)["USER_MAX_ACTIVE_IMAGE_JOBS"]
    return "\n".join([
        r"\set id :idbase + :client_id * 100000000 + :n",
        rf"\set u (:client_id + :n) % {USERS}",
        pgbench.bind(owned_jobs.CREATE_JOB, {
            1: ":id", 2: ":kind", 3: "'user_' || :u", 4: "NULL", 5: ":prompt",
            6: ":prompt_norm", 7: ":params", 8: ":message", 9: "NULL", 10: "NULL",
            11: ":action", 12: ":payload", 13: "false", 14: limit, 15: limit,
            16: "interval '1 hour'",
        }),
        r"\set n :n + 1",
        "",
    ])


def pgbench_variables(idbase: int) -> dict[str, str | int]:
    """What the gateway binds for the same request, computed by its own code."""
    job_request = decode_body(request_body(0), REQUEST_TYPES[Kind.IMAGE])
    fields = {k: v for k, v in msgspec.to_builtins(job_request).items() if v is not None}
    payload = {**fields, "job_id": "00000000-0000-4000-8000-000000000000", "user_id": "user_0"}
    return {
        "n": 0,
        "idbase": idbase,
        "kind": Kind.IMAGE.value,
        "prompt": job_request.prompt,
        "prompt_norm": normalize(job_request.prompt),
        "params": msgspec.json.encode(_params(fields)).decode(),
        "message": PENDING_MESSAGE,
        "action": "generate",
        "payload": msgspec.json.encode(payload).decode(),
    }


COUNTS = """
SELECT
  (SELECT count(*) FROM jobs WHERE id !~ '^[0-9]+$') AS jobs,
  (SELECT count(*) FROM outbox o JOIN jobs j ON j.id = o.job_id
     WHERE j.id !~ '^[0-9]+$' AND o.action = 'generate') AS outbox_rows,
  (SELECT count(*) FROM outbox o JOIN jobs j ON j.id = o.job_id
     WHERE j.id !~ '^[0-9]+$' AND o.delivered_at IS NOT NULL) AS delivered
"""


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    row = await conn.fetchrow(COUNTS)
    assert row is not None
    return dict(row)


async def run(args: argparse.Namespace, out: Path) -> tuple[list[Figure], dict[str, Any]]:
    count: int = args.creates
    # pgbench runs before and after the gateway, each half as many transactions
    per_client = math.ceil(count / CONNECTIONS / 2)
    detail: dict[str, Any] = {"creates": count, "connections": CONNECTIONS,
                              "batch_max": args.batch_max,
                              "user_limits": args.user_limits, "repetitions": []}
    secret, _ = new_webhook_secret()
    hs_secret = "bench-create-" + "y" * 40
    script = pgbench_script(args.user_limits, count)
    (out / "create-pgbench.sql").write_text(script)
    async with scratch_database("create") as dsn:
        conn = await asyncpg.connect(dsn)
        backend_port = free_port()
        backend = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.backend_double", str(backend_port),
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            for rep in range(args.repeat):
                load = wait_for_quiet(args.quiet_load, args.quiet_wait)
                print(f"create #{rep + 1}: load {load[0]:.2f}; pgbench, {CONNECTIONS} clients, "
                      f"2 x {per_client * CONNECTIONS:,} transactions, before and after the "
                      f"gateway", flush=True)

                async def limit_run(half: int, rep: int = rep) -> pgbench.PgbenchResult:
                    result = pgbench.run(dsn, script, clients=CONNECTIONS,
                                         transactions_per_client=per_client,
                                         variables=pgbench_variables((2 * rep + half + 1)
                                                                     * 10**12))
                    # pgbench's jobs go, so that no dispatcher has anything of theirs to send
                    await conn.execute("DELETE FROM jobs WHERE id ~ '^[0-9]+$'")
                    return result

                before_limit = await limit_run(0)
                before = await _counts(conn)
                port = free_port()
                stream = build_stream(count, port, hs_secret)
                stream_path = out / f"create-stream-{rep}.bin"
                write_requests(stream_path, stream)
                env = gateway_env(dsn, port, WEBHOOK_SECRETS=secret, AUTH_HS256_SECRET=hs_secret,
                                  BACKEND_URL=f"http://127.0.0.1:{backend_port}",
                                  **user_limits(args.user_limits, count),
                                  **batching_env(args.batch_max))
                server = Server(["serve", "--workers", str(args.workers), "--no-migrate"], env,
                                out / f"create-server-{rep}.log")
                try:
                    await server.wait_ready()
                    pids = server.pids()
                    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
                    pg_cpu_before = postgres_cpu_seconds()
                    backend_cpu_before = cpu_seconds(backend.pid)
                    print(f"create #{rep + 1}: sending {count:,} creations over "
                          f"{CONNECTIONS} connections", flush=True)
                    with profiled(pids, out, args.profile_seconds, args.profile and rep == 0):
                        gateway = replay(stream_path, port, connections=CONNECTIONS)
                    gateway_cpu = sum(cpu_seconds(pid) - cpu_before[pid] for pid in pids)
                    # during the burst: the database, and the backend double the dispatchers
                    # deliver to meanwhile
                    pg_cpu = postgres_cpu_seconds() - pg_cpu_before
                    backend_cpu = cpu_seconds(backend.pid) - backend_cpu_before
                    batches = batch_sizes(port).get("create", {})
                    after = await _counts(conn)
                    # the outbox drains after the burst: every job reaches the backend
                    drain_started = time.monotonic()
                    while (after["delivered"] - before["delivered"] < count
                           and time.monotonic() - drain_started < 120):
                        await asyncio.sleep(0.5)
                        after = await _counts(conn)
                    drain = time.monotonic() - drain_started
                finally:
                    server.stop()
                limit = pgbench.combine([before_limit, await limit_run(1)])
                stream_path.unlink()
                errors = gateway.error_count(ok_statuses=(202,))
                created = after["jobs"] - before["jobs"]
                queued = after["outbox_rows"] - before["outbox_rows"]
                delivered = after["delivered"] - before["delivered"]
                effects_ok = created == count and queued == count
                rep_detail = {
                    "load_before": load,
                    "gateway": {**gateway.as_dict(), "errors": errors},
                    "gateway_cpu_seconds": round(gateway_cpu, 2),
                    "postgres_cpu_seconds": round(pg_cpu, 2),
                    "backend_double_cpu_seconds": round(backend_cpu, 2),
                    "pgbench": limit.as_dict(),
                    "ratio": gateway.throughput / limit.tps,
                    "batches": batches,
                    "effects": {"jobs": created, "outbox_rows": queued, "expected": count,
                                "delivered": delivered, "drain_seconds": round(drain, 1),
                                "ok": effects_ok},
                }
                detail["repetitions"].append(rep_detail)
                print(f"create #{rep + 1}: gateway {gateway.throughput:,.0f}/s "
                      f"p50 {gateway.p50_ms:.1f} ms p99 {gateway.p99_ms:.1f} ms errors {errors}; "
                      f"pgbench {limit.tps:,.0f}/s; ratio {gateway.throughput / limit.tps:.2f}; "
                      f"jobs {created:,}, outbox {queued:,}, delivered {delivered:,} "
                      f"({drain:.1f} s after the burst); CPU s during the burst: gateway "
                      f"{gateway_cpu:.1f}, postgres {pg_cpu:.1f}, backend double "
                      f"{backend_cpu:.1f}, sender {gateway.sender_cpu_seconds:.1f}; "
                      f"{batches_text(batches, 'creates')}", flush=True)
        finally:
            backend.terminate()
            await backend.wait()
            await conn.close()
    return figures(detail), detail


def figures(detail: dict[str, Any]) -> list[Figure]:
    reps = detail["repetitions"]
    ratios = [r["ratio"] for r in reps]
    mid = sorted(reps, key=lambda r: r["ratio"])[len(reps) // 2]
    gw, pg = mid["gateway"], mid["pgbench"]
    errors = sum(r["gateway"]["errors"] for r in reps)
    effects_ok = all(r["effects"]["ok"] for r in reps)
    delivered_ok = all(r["effects"]["delivered"] == r["effects"]["expected"] for r in reps)
    # group commit may beat pgbench's one transaction per create; without it, 0.6 of it
    grouped = detail.get("batch_max") is None or detail["batch_max"] > 1
    floor = 1.0 if grouped else 0.6
    means = [r["batches"]["mean"] for r in reps if r.get("batches")]
    batch_note = f"; creates per transaction {span(means, '', 1)}" if means else ""
    # during the burst the dispatcher already delivers the jobs, to the backend double
    budget = cpu_budget({"server": mid["gateway_cpu_seconds"],
                         "PostgreSQL": mid["postgres_cpu_seconds"],
                         "backend double": mid["backend_double_cpu_seconds"],
                         "sender": gw["sender_cpu_seconds"]},
                        gw["sent"], pg["tps"], floor, "create")
    return [
        Figure("create", "creates/s", gw["throughput"], "/s", pg["tps"], median(ratios),
               f">= {floor}", median(ratios) >= floor,
               note=f"ratio {span(ratios)} over {len(reps)} runs{batch_note}; "
                    f"median run: {budget}"),
        Figure("create", "p50 latency", gw["p50_ms"], "ms", pg["p50_ms"],
               gw["p50_ms"] / pg["p50_ms"]),
        Figure("create", "p99 latency", gw["p99_ms"], "ms", pg["p99_ms"],
               gw["p99_ms"] / pg["p99_ms"]),
        Figure("create", "errors", errors, "", sum(r["pgbench"]["failed"] for r in reps),
               None, "0", errors == 0),
        Figure("create", "jobs + outbox rows in the database",
               "exact" if effects_ok else "WRONG", target="exact", met=effects_ok),
        Figure("create", "all delivered to the backend", "yes" if delivered_ok else "NO",
               met=delivered_ok,
               note="outbox drained in " + ", ".join(
                   f"{r['effects']['drain_seconds']} s" for r in reps) + " after the burst"),
    ]
