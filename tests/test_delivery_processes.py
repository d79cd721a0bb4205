"""Two real server processes share one outbox: every job delivered, none sent twice at once."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from gateway.jobs.kinds import Kind
from gateway.jobs.state import Status
from gateway.store import Database, outbox
from tests.backend import ACCEPT, Call, Reply, ScriptedBackend, eventually, status
from tests.factories import insert_job
from tests.procs import Proc, free_port, serve_env, start

JOBS = 300

# What a flaky backend does to the first calls of a job; the rest are accepted.
TROUBLES: list[tuple[Reply, ...]] = [
    (),
    (),
    (),
    (Reply(hang=0.02),),
    (status(500),),
    (status(503, retry_after="0"), status(502)),
    (status(429, retry_after="1"),),
    (Reply(lose_answer=True),),
    (Reply(drop=True),),
    (Reply(hang=math.inf),),
]


@pytest.mark.reliability
async def test_two_processes_deliver_every_job_of_a_flaky_backend_never_twice_at_once(
    database_url: str, db: Database, aiohttp_server: Any
) -> None:
    rng = random.Random(20260)
    plans: dict[str, list[Reply]] = {}

    def flaky(call: Call) -> Reply:
        plan = plans.get(call.job_id)
        return plan.pop(0) if plan else ACCEPT

    backend = ScriptedBackend(default=flaky)
    await backend.start(aiohttp_server)
    env = serve_env(
        database_url,
        BACKEND_URL=backend.url,
        BACKEND_TIMEOUT_SECONDS="1",
        DELIVERY_RETRY_SCHEDULE="50ms 100ms 200ms 400ms 800ms",
    )
    procs: list[Proc] = []
    try:
        for _ in range(2):
            procs.append(start(["serve", "--no-migrate"], {**env, "PORT": str(free_port())}))
        for proc in procs:
            await proc.wait_log('"event": "delivery_started"')

        job_ids = []
        for n in range(JOBS):
            kind = Kind.IMAGE if n % 3 else Kind.VIDEO
            job_id = await insert_job(db, kind=kind, user_id=f"user_{n % 7}",
                                      prompt=f"prompt {n}", status=Status.PENDING)
            plans[job_id] = list(rng.choice(TROUBLES))
            async with db.transaction() as conn:
                await outbox.enqueue(conn, job_id, "generate", {
                    "prompt": f"prompt {n}", "job_id": job_id, "user_id": f"user_{n % 7}"})
            job_ids.append(job_id)

        async def all_delivered() -> bool:
            count = await db.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL")
            return bool(count == JOBS)

        await eventually(all_delivered, timeout=90, every=0.2)
    finally:
        results = [proc.stop() for proc in procs]

    for code, stderr in results:
        assert code == 0, stderr[-2000:]
        assert stderr.count('"event": "delivery_delivered"') > 0  # both shared the work
    assert backend.most_concurrent == 1
    assert set(backend.accepted) == set(job_ids)
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'QUEUED'") == JOBS
    # each job moved to QUEUED exactly once, whichever process and however many calls
    assert await db.fetchval(
        "SELECT count(*) FROM job_events WHERE status = 'QUEUED' AND source = 'delivery'"
    ) == JOBS
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE payload IS NOT NULL") == 0
    assert len(backend.calls) > JOBS  # the backend really was flaky
