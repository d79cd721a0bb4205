"""The database under fire: signed webhooks keep coming, and users keep creating jobs and
reading them, while every connection to the gateway's database is killed every 200 ms; then
the server is stopped in immediate mode (no checkpoint: crash recovery), left down for a
second, and started again.

Every answer is a 2xx or a 503 with Retry-After, never a 500, never a hang; every request
answered 2xx has its effect in the database; the service answers 2xx again within 5 s of the
database being back; and once the senders' retries are done nothing is lost, and each
Idempotency-Key made one job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg

from gateway.jobs.prompts import normalize
from tests.conftest import WEBHOOK_KEY
from tests.procs import Proc, free_port, serve_env, start, wait_ready
from tests.reliability.cluster import Cluster, migrated_database, throwaway_cluster
from tests.reliability.conftest import Figures
from tests.signing import signed
from tests.tokens import user

DATABASE = "sorami"
ROUTE = "/api/webhooks/image-completion"
SENDERS = 16
# the app's users creating jobs and reading their status meanwhile
CREATORS = 4
# every fifth delivery is for a job the gateway does not know: an orphan, kept for reconcile
ORPHAN_EVERY = 5
JOBS_AVAILABLE = 20_000
WARM_UP = 1.0
KILL_EVERY = 0.2
KILL_FOR = 4.0
DOWN_FOR = 1.0
# the service answers 2xx again within this of the database being back
RECOVERY_BOUND = 5.0
# after recovery the sender goes on this long before it stops taking new jobs
AFTER_RECOVERY = 6.0
# one request: longer than any answer a healthy gateway gives, even under these faults
REQUEST_TIMEOUT = 10.0
# a delivery is retried until 2xx, sooner than the Retry-After asks (to see recovery),
# up to this deadline
DELIVERY_DEADLINE = 60.0
RETRY_PAUSE = 0.05


@dataclasses.dataclass
class Answer:
    route: str
    key: str  # the webhook id, or the client's Idempotency-Key or job id
    status: int | None  # None: no HTTP answer (connection error or timeout)
    error: str | None
    retry_after: str | None
    detail: str | None  # the body of an answer other than 2xx
    started: float
    ended: float


@dataclasses.dataclass
class Sender:
    """Requests retried until the gateway answers 2xx: signed webhooks from the backend,
    and the app's job creations (with an Idempotency-Key) and status reads."""

    base: str
    session: aiohttp.ClientSession
    answers: list[Answer] = dataclasses.field(default_factory=list)
    # webhook id -> the outcome of its 2xx answer
    acknowledged: dict[str, str] = dataclasses.field(default_factory=dict)
    # Idempotency-Key -> every job id a 202 gave for it
    created: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    unacknowledged: list[str] = dataclasses.field(default_factory=list)

    async def deliver(self, payload: dict[str, Any], msg_id: str) -> None:
        def request() -> tuple[bytes, dict[str, str]]:
            # signed afresh on each try, as a sender does, so the timestamp stays current
            return signed(payload, WEBHOOK_KEY, msg_id)

        answer = await self._until_2xx("POST", ROUTE, msg_id, request)
        if answer is not None:
            self.acknowledged[msg_id] = str(answer["outcome"])

    async def create_job(self, key: str) -> str | None:
        def request() -> tuple[bytes, dict[str, str]]:
            body = json.dumps({"prompt": f"created under faults {key}"}).encode()
            return body, {**user("user_c"), "Content-Type": "application/json",
                          "Idempotency-Key": key}

        answer = await self._until_2xx("POST", "/api/images/generate", key, request)
        if answer is None:
            return None
        job_id = str(answer["job_id"])
        self.created.setdefault(key, set()).add(job_id)
        return job_id

    async def read_status(self, job_id: str) -> None:
        def request() -> tuple[bytes, dict[str, str]]:
            return b"", user("user_c")

        await self._until_2xx("GET", f"/api/images/{job_id}/status", job_id, request)

    async def _until_2xx(
        self, method: str, route: str, key: str,
        request: Callable[[], tuple[bytes, dict[str, str]]],
    ) -> dict[str, Any] | None:
        """The JSON of the first 2xx answer; None when the deadline passed without one."""
        deadline = time.monotonic() + DELIVERY_DEADLINE
        while time.monotonic() < deadline:
            body, headers = request()
            answer, document = await self._send(method, route, key, body, headers)
            self.answers.append(answer)
            if document is not None:
                return document
            await asyncio.sleep(RETRY_PAUSE)
        self.unacknowledged.append(f"{method} {route} {key}")
        return None

    async def _send(self, method: str, route: str, key: str, body: bytes,
                    headers: dict[str, str]) -> tuple[Answer, dict[str, Any] | None]:
        started = time.monotonic()
        try:
            async with self.session.request(method, self.base + route, data=body or None,
                                            headers=headers) as resp:
                raw = await resp.read()
                document = json.loads(raw) if 200 <= resp.status < 300 else None
                detail = raw.decode(errors="replace")[:300] if document is None else None
                return Answer(route, key, resp.status, None, resp.headers.get("Retry-After"),
                              detail, started, time.monotonic()), document
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Answer(route, key, None, type(exc).__name__, None, None, started,
                          time.monotonic()), None


def generating(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "status": "generating", "progress": 60, "user_id": "user_a"}


def completed(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "status": "completed", "progress": 100, "user_id": "user_a",
            "original_prompt": f"prompt of {job_id}",
            "data": {"images": [{"url": f"https://cdn.test/{job_id}/1.png", "format": "PNG",
                                 "dimensions": "1024x1024", "file_path": f"{job_id}/1.png"}]}}


async def prepare(cluster: Cluster) -> str:
    """A migrated database with the jobs the webhooks are for (QUEUED, as after delivery)."""
    dsn = await migrated_database(cluster, DATABASE)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.copy_records_to_table(
            "jobs",
            columns=["id", "kind", "user_id", "prompt", "prompt_norm", "status"],
            records=[(f"job-{n:05d}", "image", "user_a", f"prompt of job-{n:05d}",
                      normalize(f"prompt of job-{n:05d}"), "QUEUED")
                     for n in range(JOBS_AVAILABLE) if n % ORPHAN_EVERY != ORPHAN_EVERY - 1],
        )
    finally:
        await conn.close()
    return dsn


class Killer:
    """Terminates every backend of the gateway's database every KILL_EVERY seconds."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.rounds = 0
        self.killed = 0

    async def run(self, seconds: float) -> None:
        conn = await asyncpg.connect(self.cluster.dsn(), timeout=10)
        try:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                killed = await conn.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    DATABASE, timeout=5)
                self.rounds += 1
                self.killed += int(killed)
                await asyncio.sleep(KILL_EVERY)
        finally:
            await conn.close()


@contextlib.contextmanager
def gateway(dsn: str) -> Iterator[tuple[Proc, int]]:
    port = free_port()
    env = serve_env(dsn, PORT=str(port), LOG_LEVEL="warning")
    proc = start(["serve", "--no-migrate", "--workers", "2"], env)
    try:
        yield proc, port
    finally:
        proc.stop()


async def test_killed_connections_and_an_immediate_restart_are_503_then_recovered_nothing_lost(
    figures: Figures,
) -> None:
    with throwaway_cluster() as cluster:
        dsn = await prepare(cluster)
        with gateway(dsn) as (proc, port):
            await wait_ready(port, timeout=30)
            await run_scenario(cluster, dsn, proc, port, figures)


async def run_scenario(cluster: Cluster, dsn: str, proc: Proc, port: int,
                       figures: Figures) -> None:
    taken = itertools.count()
    stop_taking = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=SENDERS + CREATORS), timeout=timeout
    ) as session:
        sender = Sender(f"http://127.0.0.1:{port}", session)
        jobs: list[str] = []
        orphans: list[str] = []
        keys = itertools.count()

        async def create_continuously() -> None:
            while not stop_taking.is_set():
                job_id = await sender.create_job(f"key-{next(keys):05d}")
                if job_id is not None:
                    await sender.read_status(job_id)

        async def send_continuously() -> None:
            while not stop_taking.is_set():
                n = next(taken)
                assert n < JOBS_AVAILABLE, "the sender ran out of prepared jobs"
                if n % ORPHAN_EVERY == ORPHAN_EVERY - 1:
                    backend_id = f"backend-{n:05d}"
                    orphans.append(backend_id)
                    await sender.deliver(completed(backend_id), f"msg-{backend_id}-completed")
                    continue
                job_id = f"job-{n:05d}"
                jobs.append(job_id)
                await sender.deliver(generating(job_id), f"msg-{job_id}-generating")
                await sender.deliver(completed(job_id), f"msg-{job_id}-completed")

        killer = Killer(cluster)
        began = time.monotonic()
        senders = [asyncio.create_task(send_continuously()) for _ in range(SENDERS)]
        senders += [asyncio.create_task(create_continuously()) for _ in range(CREATORS)]
        try:
            await asyncio.sleep(WARM_UP)
            faults_began = time.monotonic()
            await asyncio.wait_for(killer.run(KILL_FOR), KILL_FOR + 10)
            down_at = time.monotonic()
            await asyncio.wait_for(asyncio.to_thread(cluster.stop, "immediate"), 60)
            await asyncio.sleep(DOWN_FOR)
            up_at = await asyncio.wait_for(asyncio.to_thread(cluster.start), 90)
            await asyncio.sleep(AFTER_RECOVERY)
            stop_taking.set()
            await asyncio.wait_for(asyncio.gather(*senders), DELIVERY_DEADLINE + 30)
        finally:
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
        elapsed = time.monotonic() - began

    answers = sender.answers
    by_status = collections.Counter(
        str(a.status) if a.status is not None else a.error for a in answers)
    ok = [a for a in answers if a.status is not None and 200 <= a.status < 300]
    unavailable = [a for a in answers if a.status == 503]
    others = [a for a in answers
              if a.status is None or not (200 <= a.status < 300 or a.status == 503)]
    after_up = sorted((a for a in ok if a.started >= up_at), key=lambda a: a.ended)
    recovery = after_up[0].ended - up_at if after_up else float("inf")
    late_503 = [a for a in unavailable if a.started >= up_at + RECOVERY_BOUND]

    lost = await count_lost(dsn, jobs, orphans, sender)

    figures["webhooks"] = len(jobs) * 2 + len(orphans)
    figures["jobs created through the client API"] = len(sender.created)
    figures["requests"] = len(answers)
    figures["requests by route"] = dict(collections.Counter(
        "webhook" if a.route == ROUTE else "create" if a.route.endswith("generate")
        else "status" for a in answers))
    figures["answers by status"] = dict(sorted(by_status.items()))
    figures["2xx"] = len(ok)
    figures["503"] = len(unavailable)
    figures["503 while connections were killed"] = sum(
        1 for a in unavailable if faults_began <= a.started < down_at)
    figures["503 while the database was down or restarting"] = sum(
        1 for a in unavailable if down_at <= a.started < up_at)
    figures["503 after the database was up"] = sum(1 for a in unavailable if a.started >= up_at)
    figures["duplicates answered after a 503"] = sum(
        1 for outcome in sender.acknowledged.values() if outcome == "duplicate")
    figures["kill rounds"] = killer.rounds
    figures["connections killed"] = killer.killed
    figures["faults window s"] = up_at - faults_began
    figures["database down s"] = up_at - down_at
    figures["recovery s (database up to first 2xx)"] = recovery
    figures["lost"] = lost
    figures["unacknowledged after retries"] = len(sender.unacknowledged)
    figures["duration s"] = elapsed

    assert not others, f"answers other than 2xx/503: {others[:5]}\n{proc.stderr[-3000:]}"
    assert all(a.retry_after for a in unavailable), "a 503 without Retry-After"
    assert figures["503 while connections were killed"] > 0, "the kills reached no request"
    assert killer.killed > killer.rounds, "the killer found no gateway connections"
    assert recovery <= RECOVERY_BOUND, f"first 2xx {recovery:.2f} s after the database was up"
    assert not late_503, f"{len(late_503)} 503s more than {RECOVERY_BOUND} s after recovery"
    assert not sender.unacknowledged, f"never acknowledged: {sender.unacknowledged[:5]}"
    assert lost == 0
    assert '"event": "unhandled_error"' not in proc.stderr


async def count_lost(dsn: str, jobs: list[str], orphans: list[str], sender: Sender) -> int:
    """Deliveries answered 2xx whose effect is not in the database, plus jobs not finished
    as their webhooks said."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        recorded = {
            r["dedupe_key"].removeprefix("id:"): r["outcome"]
            for r in await conn.fetch("SELECT dedupe_key, outcome FROM webhook_deliveries")
        }
        finished = {
            r["id"]: (r["status"], r["progress"], r["files"])
            for r in await conn.fetch(
                "SELECT j.id, j.status, j.progress, "
                "(SELECT count(*) FROM job_files f WHERE f.job_id = j.id) AS files "
                "FROM jobs j WHERE j.id = ANY($1::text[])", jobs)
        }
        made = {
            r["idempotency_key"]: (r["ids"], r["outbox_rows"])
            for r in await conn.fetch(
                "SELECT j.idempotency_key, array_agg(j.id) AS ids, "
                "(SELECT count(*) FROM outbox o WHERE o.job_id = ANY(array_agg(j.id))) "
                "AS outbox_rows FROM jobs j WHERE j.user_id = 'user_c' GROUP BY 1")
        }
        kept = {
            r["backend_job_id"]
            for r in await conn.fetch(
                "SELECT backend_job_id FROM orphans WHERE backend_job_id = ANY($1::text[])",
                orphans)
        }
    finally:
        await conn.close()
    missing_records = [m for m in sender.acknowledged if m not in recorded]
    unfinished = [j for j in jobs if finished.get(j) != ("COMPLETED", 100, 1)]
    dropped_orphans = [o for o in orphans if o not in kept]
    expected = {f"msg-{j}-{step}" for j in jobs for step in ("generating", "completed")} | {
        f"msg-{o}-completed" for o in orphans}
    never_recorded = expected - recorded.keys()
    # one job (and its one outbox row) per key, the one its 202s named, and no job unasked
    wrong_jobs = [key for key, ids in sender.created.items()
                  if len(ids) != 1 or made.get(key) != (list(ids), 1)]
    unasked = made.keys() - sender.created.keys()
    return (len(set(missing_records) | never_recorded) + len(unfinished) + len(dropped_orphans)
            + len(wrong_jobs) + len(unasked))
