"""Group commit: deliveries and creates gathered while a transaction is in flight commit
together, each answered with its own outcome, exactly as one by one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import msgspec
import pytest
from prometheus_client import REGISTRY

from gateway.batching import GroupCommit, Stage
from gateway.jobs.kinds import Kind
from gateway.jobs.limits import Limits
from gateway.jobs.payload import decode
from gateway.jobs.state import Status
from gateway.store import Database
from gateway.store.owned_jobs import CreateRequest, Creation, NewJob
from gateway.store.webhooks import Delivery
from gateway.usecases.ingest import Ingested, Outcome, ingest, ingest_alone, ingest_many
from gateway.usecases.jobs import create_alone, create_many
from tests.factories import insert_job
from tests.test_webhooks_ingest import STEPS, completed, progress


def delivery(payload: dict[str, Any], msg_id: str, kind: Kind = Kind.IMAGE) -> Delivery:
    body = msgspec.json.encode(payload)
    return Delivery(kind, f"id:{msg_id}", decode(body), body)


def twice_each(job_id: str, order: Sequence[tuple[str, int]]) -> list[Delivery]:
    """One job's webhooks in `order`, each delivered twice in a row."""
    out = []
    for step, (status, value) in enumerate(order):
        payload = (completed(job_id, files=1) if status == "completed"
                   else progress(job_id, status, value))
        out += [delivery(payload, f"{job_id}-{step}")] * 2
    return out


async def end_state(db: Database, job_id: str) -> tuple[Any, ...]:
    """Everything the deliveries wrote for the job, without its id."""
    job = await db.fetchrow(
        "SELECT status, progress, message, error_message, model_name, generation_time_seconds,"
        " seq, finished_at IS NOT NULL AS finished, first_webhook_at IS NOT NULL AS touched"
        " FROM jobs WHERE id = $1", job_id)
    events = await db.fetch("SELECT seq, status, progress, message, source FROM job_events"
                            " WHERE job_id = $1 ORDER BY seq", job_id)
    files = await db.fetch("SELECT position, url, filename, size_bytes FROM job_files"
                           " WHERE job_id = $1 ORDER BY position", job_id)
    keys = await db.fetch("SELECT replace(dedupe_key, $1, '') AS key, outcome, event_status"
                          " FROM webhook_deliveries WHERE job_id = $1 ORDER BY 1", job_id)
    notes = await db.fetch("SELECT type, title, message FROM notifications WHERE job_id = $1",
                           job_id)
    return (dict(job or {}), [dict(r) for r in events], [dict(r) for r in files],
            [dict(r) for r in keys], [dict(r) for r in notes])


async def test_every_order_of_one_jobs_webhooks_with_duplicates_in_one_batch_ends_as_one_by_one(
    db: Database,
) -> None:
    finals = set()
    for n, order in enumerate(itertools.permutations(STEPS)):
        together, alone = f"together-{n}", f"alone-{n}"
        await insert_job(db, job_id=together)
        await insert_job(db, job_id=alone)
        async with db.connection() as conn:
            batched = await ingest_many(conn, twice_each(together, order))
            one_by_one = [await ingest(conn, d) for d in twice_each(alone, order)]
        assert all(outcome is not None for outcome in batched)
        assert [o.outcome for o in batched if o] == [o.outcome for o in one_by_one]
        # the second of each pair is a duplicate, inside the batch as across transactions
        assert [o.outcome for o in batched if o][1::2] == [Outcome.DUPLICATE] * len(STEPS)
        state = await end_state(db, together)
        assert state == await end_state(db, alone)
        finals.add((state[0]["status"], state[0]["progress"], len(state[2]), len(state[4])))
    assert finals == {("COMPLETED", 100, 1, 1)}


async def test_one_delivery_per_job_goes_pipelined_and_ends_as_one_by_one(db: Database) -> None:
    def mixed(prefix: str) -> list[Delivery]:
        # progress and terminal events of different jobs, and ids nobody knows, interleaved
        return [delivery(completed(f"{prefix}-0"), f"{prefix}-0-m"),
                delivery(progress(f"{prefix}-1", "generating", 40), f"{prefix}-1-m"),
                delivery(completed(f"{prefix}-unknown"), f"{prefix}-u1"),
                delivery(progress(f"{prefix}-2", "generating", 30), f"{prefix}-2-m"),
                delivery({"job_id": f"{prefix}-3", "status": "failed",
                          "error_message": "quota exceeded"}, f"{prefix}-3-m"),
                delivery(progress(f"{prefix}-4", "initializing", 10), f"{prefix}-4-m")]

    for prefix in ("together", "alone"):
        for n in range(5):
            await insert_job(db, job_id=f"{prefix}-{n}",
                             status=Status.COMPLETED if n == 4 else Status.QUEUED)
    async with db.connection() as conn:
        batched = await ingest_many(conn, mixed("together"))
        one_by_one = [await ingest(conn, d) for d in mixed("alone")]
    assert [o.outcome if o else None for o in batched] == [
        Outcome.APPLIED, Outcome.APPLIED, None, Outcome.APPLIED, Outcome.APPLIED, Outcome.STALE]
    assert [o.outcome for o in one_by_one] == [
        Outcome.APPLIED, Outcome.APPLIED, Outcome.ORPHANED, Outcome.APPLIED, Outcome.APPLIED,
        Outcome.STALE]
    for n in range(5):
        assert await end_state(db, f"together-{n}") == await end_state(db, f"alone-{n}")
    # the unknown id was left alone: nothing written for it
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries"
                             " WHERE dedupe_key = 'id:together-u1'") == 0


@contextlib.asynccontextmanager
async def rows_locked(database_url: str, *job_ids: str) -> AsyncIterator[asyncpg.Connection]:
    """The jobs' rows locked by another transaction until the block ends."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM jobs WHERE id = ANY($1::text[]) FOR UPDATE",
                               list(job_ids))
            yield conn
    finally:
        await conn.close()


async def waiting_for_locks(db: Database, count: int) -> None:
    """Until `count` statements wait for a lock."""
    for _ in range(500):
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()")
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} statements never waited for a lock")


def batch_sizes(stage: str) -> tuple[float, float]:
    """How many batches the stage ran, and how many items in all."""
    labels = {"stage": stage}
    return (REGISTRY.get_sample_value("sorami_batch_size_count", labels) or 0.0,
            REGISTRY.get_sample_value("sorami_batch_size_sum", labels) or 0.0)


def queued(stage: str) -> float:
    """Requests waiting in the stage's queues of this process."""
    return REGISTRY.get_sample_value("sorami_batch_queued", {"stage": stage}) or 0.0


def webhook_stage(db: Database, in_flight: int = 1) -> GroupCommit[Delivery, Ingested]:
    async def alone(d: Delivery) -> Ingested:
        return await ingest_alone(db, d)

    return GroupCommit(db, Stage("webhook", ingest_many, alone), max_items=64,
                       in_flight=in_flight)


async def test_deliveries_queued_behind_a_transaction_in_flight_commit_together(
    db: Database, database_url: str
) -> None:
    plug = await insert_job(db, job_id="plug")
    jobs = [await insert_job(db, job_id=f"job-{i}") for i in range(6)]
    stage = webhook_stage(db)
    batches_before, items_before = batch_sizes("webhook")
    queued_before = queued("webhook")
    async with rows_locked(database_url, plug):
        first = asyncio.ensure_future(stage.submit(delivery(completed(plug), "plug")))
        await waiting_for_locks(db, 1)
        # one job's completion twice, an unknown id, and a progress for each other job
        rest = [delivery(completed(jobs[0]), "done-0"), delivery(completed(jobs[0]), "done-0"),
                delivery(completed("nobody-knows"), "orphan"),
                *(delivery(progress(j, "generating", 40), f"gen-{j}") for j in jobs[1:])]
        answers = [asyncio.ensure_future(stage.submit(d)) for d in rest]
        await asyncio.sleep(0.05)
        assert not any(a.done() for a in answers)
        assert queued("webhook") == queued_before + 8
    assert (await first).outcome is Outcome.APPLIED
    outcomes = [(await a).outcome for a in answers]
    assert outcomes == [Outcome.APPLIED, Outcome.DUPLICATE, Outcome.ORPHANED,
                        *[Outcome.APPLIED] * 5]
    batches_after, items_after = batch_sizes("webhook")
    # the plug alone, then the eight together
    assert (batches_after - batches_before, items_after - items_before) == (2, 9)
    assert queued("webhook") == queued_before
    assert await db.fetchval("SELECT count(*) FROM orphans WHERE backend_job_id = 'nobody-knows'"
                             ) == 1
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 8  # 9 less the duplicate
    await stage.close()


async def test_a_delivery_failing_on_its_own_is_answered_as_alone_and_the_others_commit(
    db: Database, database_url: str
) -> None:
    plug = await insert_job(db, job_id="plug")
    good = [await insert_job(db, job_id=f"good-{i}") for i in range(3)]
    bad = await insert_job(db, job_id="bad")
    stage = webhook_stage(db)
    # a constraint only this delivery's event breaks: its statement fails, for it alone
    await db.execute("ALTER TABLE job_events ADD CONSTRAINT no_poison CHECK (message <> 'poison')")
    poisoned = delivery(progress(bad, "generating", 50) | {"message": "poison"}, "bad")
    with pytest.raises(Exception) as alone:  # noqa: PT011 - whatever today's path raises
        await ingest_alone(db, poisoned)
    async with rows_locked(database_url, plug):
        first = asyncio.ensure_future(stage.submit(delivery(completed(plug), "plug")))
        await waiting_for_locks(db, 1)
        items = [delivery(completed(good[0]), "g0"), poisoned,
                 delivery(completed(good[1]), "g1"), delivery(completed(good[2]), "g2")]
        answers = [asyncio.ensure_future(stage.submit(d)) for d in items]
        await asyncio.sleep(0.05)
    await first
    results = await asyncio.gather(*answers, return_exceptions=True)
    assert [r.outcome for r in results if isinstance(r, Ingested)] == [Outcome.APPLIED] * 3
    assert type(results[1]) is alone.type
    assert await db.fetchval("SELECT status FROM jobs WHERE id = 'bad'") == "QUEUED"
    assert await db.fetchval(
        "SELECT count(*) FROM jobs WHERE id LIKE 'good-%' AND status = 'COMPLETED'") == 3
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE dedupe_key = 'id:bad'"
                             ) == 0
    await stage.close()


def new_job(n: int, user: str, key: str | None = None, prompt: str = "a red kite") -> NewJob:
    return NewJob(id=f"create-{n}", kind=Kind.IMAGE, user_id=user, org_id=None, prompt=prompt,
                  params={}, message="Queued", idempotency_key=key,
                  request_hash=None if key is None else f"hash:{prompt}")


@pytest.mark.parametrize("limits", [Limits(0, 0), Limits(3, 100)], ids=["off", "on"])
async def test_creates_in_one_batch_answer_as_one_by_one(db: Database, limits: Limits) -> None:
    requests = [
        CreateRequest(new_job(0, "ann", "k1"), {}, limits),
        CreateRequest(new_job(1, "ann", "k1"), {}, limits),  # the same key again
        CreateRequest(new_job(2, "ann", "k1", prompt="other"), {}, limits),  # reused
        CreateRequest(new_job(3, "bob"), {}, limits),
        CreateRequest(new_job(4, "ann"), {}, limits),
        CreateRequest(new_job(5, "ann"), {}, limits),
        CreateRequest(new_job(6, "ann"), {}, limits),  # the 4th active job of ann
    ]
    async with db.connection() as conn:
        creations = await create_many(conn, requests)
    summary = [_summary(c) for c in creations]
    expected_last = "refused" if limits.active else "created"
    assert summary == [("created", "create-0", True), ("existing", "create-0", True),
                       ("existing", "create-0", False), ("created", "create-3", True),
                       ("created", "create-4", True), ("created", "create-5", True),
                       (expected_last, "create-6" if limits == Limits(0, 0) else None, True)]
    assert await db.fetchval("SELECT count(*) FROM outbox") == (4 if limits.active else 5)
    # one by one on a second database state gives the same answers
    await db.execute("TRUNCATE jobs, outbox, job_usage, job_usage_changes CASCADE")
    alone = [_summary(await create_alone(db, r)) for r in requests]
    assert alone == summary


def _summary(creation: Creation | None) -> tuple[str, str | None, bool]:
    assert creation is not None
    created = creation.created
    if created is None:
        return "refused", None, True
    return ("created" if created.inserted else "existing"), created.id, created.same_request


# Two batches made to deadlock: two jobs, each also known by an alias that sorts after both
# ids, so that side A's batch locks j1 then (through its alias) j2, and side B's j2 then j1.
CROSSED = (
    [(progress("j1", "generating", 40), "a-1"), (progress("zz-2", "generating", 40), "a-2")],
    [(progress("j2", "generating", 50), "b-1"), (progress("zz-1", "generating", 50), "b-2")],
)


async def crossed_jobs(db: Database) -> list[str]:
    """The jobs of CROSSED, and a job per side to plug its stage with: the plugs' ids."""
    for job_id, alias in (("j1", "zz-1"), ("j2", "zz-2")):
        await insert_job(db, job_id=job_id)
        await db.execute("INSERT INTO job_aliases (kind, backend_job_id, job_id, source)"
                         " VALUES ('image', $1, $2, 'delivery')", alias, job_id)
    return [await insert_job(db, job_id=f"plug-{side}") for side in "ab"]


@contextlib.asynccontextmanager
async def crossing(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """CROSSED's jobs locked by another transaction until the block ends: j1, then j2 in the
    savepoint `j2`, which `cross` rolls back."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM jobs WHERE id = 'j1' FOR UPDATE")
            await conn.execute("SAVEPOINT j2")
            await conn.execute("SELECT 1 FROM jobs WHERE id = 'j2' FOR UPDATE")
            yield conn
    finally:
        await conn.close()


async def cross(db: Database, blocker: asyncpg.Connection) -> None:
    """With side A's batch waiting for j1 and side B's for j2, B gets j2 and queues for j1
    behind A: when the blocker's transaction ends, A takes j1 and waits for j2, which B
    holds while waiting for j1. A deadlock, however the two are scheduled."""
    await waiting_for_locks(db, 2)
    await blocker.execute("ROLLBACK TO SAVEPOINT j2")
    # B's second statement waits for j1's tuple lock, which A, first in line, holds
    for _ in range(500):
        if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'tuple'"
                             " AND datname = current_database()"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("side B never queued for j1 behind side A")


async def check_crossed(db: Database, outcomes: Sequence[str]) -> None:
    """After both sides of CROSSED were answered `outcomes` (A's two, then B's two)."""
    # whichever went second ran again after the other committed: B's progress (50) applies
    # either way, A's (40) only if it went first
    a_side, b_side = list(outcomes[:2]), list(outcomes[2:])
    assert b_side == ["applied"] * 2
    assert a_side in (["applied"] * 2, ["stale"] * 2)
    assert [(r["id"], r["progress"]) for r in await db.fetch(
        "SELECT id, progress FROM jobs WHERE id IN ('j1', 'j2') ORDER BY id")] == [
        ("j1", 50), ("j2", 50)]
    # each delivery recorded once, as it was answered, and an event for each applied
    recorded = dict(await db.fetch(
        "SELECT dedupe_key, outcome FROM webhook_deliveries WHERE dedupe_key IN"
        " ('id:a-1', 'id:a-2', 'id:b-1', 'id:b-2')"))
    assert recorded == {f"id:{key}": outcome for key, outcome in
                        zip(("a-1", "a-2", "b-1", "b-2"), outcomes, strict=True)}
    assert await db.fetchval("SELECT count(*) FROM job_events WHERE job_id IN ('j1', 'j2')"
                             ) == list(outcomes).count("applied")


async def test_a_deadlock_between_two_pools_batches_is_retried_and_answered_once(
    db: Database, database_url: str
) -> None:
    # the same between two `serve` processes: tests/test_group_commit_processes.py
    plugs = await crossed_jobs(db)
    queued_before = queued("webhook")
    retries_before = REGISTRY.get_sample_value("sorami_batch_retries_total",
                                               {"stage": "webhook"}) or 0.0
    # each side its own pool, as two processes have
    pools = [await Database.open(database_url, min_size=1, max_size=2) for _ in "ab"]
    stages = [webhook_stage(pool) for pool in pools]
    try:
        async with crossing(database_url) as blocker:
            await blocker.execute("SAVEPOINT plugs")
            await blocker.execute("SELECT 1 FROM jobs WHERE id LIKE 'plug-%' FOR UPDATE")
            plugged = [asyncio.ensure_future(stage.submit(delivery(completed(plug), plug)))
                       for stage, plug in zip(stages, plugs, strict=True)]
            await waiting_for_locks(db, 2)
            answers = [asyncio.ensure_future(stage.submit(delivery(payload, msg_id)))
                       for stage, side in zip(stages, CROSSED, strict=True)
                       for payload, msg_id in side]
            await asyncio.sleep(0.05)
            assert queued("webhook") == queued_before + 4
            # the plugs go; each side's batch then comes to its first row and waits
            await blocker.execute("ROLLBACK TO SAVEPOINT plugs")
            await asyncio.gather(*plugged)
            await cross(db, blocker)
        outcomes = [(await a).outcome.value for a in answers]
    finally:
        for stage in stages:
            await stage.close()
        for pool in pools:
            await pool.close()
    assert (REGISTRY.get_sample_value("sorami_batch_retries_total", {"stage": "webhook"})
            or 0.0) == retries_before + 1
    await check_crossed(db, outcomes)
