"""The outbox's claim protocol in the database: leases, SKIP LOCKED, ownership, ordering."""

from __future__ import annotations

import asyncio

from gateway.jobs.state import Event, Status
from gateway.store import Database, outbox
from gateway.store import jobs as store_jobs
from tests.factories import insert_job


async def enqueued(db: Database, count: int = 1) -> list[str]:
    ids = []
    for n in range(count):
        job_id = await insert_job(db, status=Status.PENDING, prompt=f"prompt {n}")
        async with db.transaction() as conn:
            await outbox.enqueue(conn, job_id, "generate", {"prompt": f"prompt {n}",
                                                            "job_id": job_id,
                                                            "user_id": "user_a"})
        ids.append(job_id)
    return ids


async def claim(db: Database, owner: str, *, lease: float = 60.0,
                limit: int = 100) -> list[outbox.Claimed]:
    async with db.connection() as conn:
        return await outbox.claim(conn, owner=owner, lease_seconds=lease, limit=limit)


async def test_concurrent_claimers_skip_each_others_rows_without_waiting(db: Database) -> None:
    await enqueued(db, 20)
    async with db.transaction() as first:
        mine = await outbox.claim(first, owner="a", lease_seconds=60, limit=5)
        # uncommitted: without SKIP LOCKED the second claimer would wait for this transaction
        theirs = await asyncio.wait_for(claim(db, "b"), timeout=5)
    assert len(mine) == 5
    assert len(theirs) == 15
    assert not {r.id for r in mine} & {r.id for r in theirs}


async def test_a_live_lease_is_not_claimed_and_an_expired_one_is(db: Database) -> None:
    [job_id] = await enqueued(db)
    [first] = await claim(db, "a", lease=0.3)
    assert await claim(db, "b") == []
    await asyncio.sleep(0.35)
    [second] = await claim(db, "b")
    assert (second.job_id, second.attempts) == (job_id, 2)
    assert first.attempts == 1


async def test_a_claim_that_lost_its_row_cannot_fail_or_reschedule_it(db: Database) -> None:
    await enqueued(db)
    [stale] = await claim(db, "a", lease=0.05)
    await asyncio.sleep(0.1)
    [current] = await claim(db, "b")
    async with db.connection() as conn:
        assert not await outbox.reschedule(conn, stale, owner="a", delay_seconds=1, error="x")
        assert not await outbox.mark_failed(conn, stale, owner="a", error="x")
        assert await outbox.reschedule(conn, current, owner="b", delay_seconds=60, error="y")
    row = await db.fetchrow("SELECT last_error, failed_at, lease_owner FROM outbox")
    assert row is not None
    assert (row["last_error"], row["failed_at"], row["lease_owner"]) == ("y", None, None)


async def test_an_accepted_call_settles_the_row_whoever_holds_it(db: Database) -> None:
    await enqueued(db)
    [stale] = await claim(db, "a", lease=0.05)
    await asyncio.sleep(0.1)
    await claim(db, "b")
    async with db.connection() as conn:
        assert await outbox.mark_delivered(conn, stale.id)
        assert not await outbox.mark_delivered(conn, stale.id)  # once
    assert await db.fetchval("SELECT payload FROM outbox") is None


async def test_released_rows_are_claimable_at_once_and_not_counted(db: Database) -> None:
    await enqueued(db, 3)
    claimed = await claim(db, "a")
    async with db.connection() as conn:
        await outbox.release(conn, [r.id for r in claimed], owner="a")
    again = await claim(db, "b")
    assert sorted(r.id for r in again) == sorted(r.id for r in claimed)
    assert {r.attempts for r in again} == {1}


async def test_a_cancel_waits_for_its_generate_row_and_a_cancelled_jobs_generate_is_due_now(
    db: Database,
) -> None:
    [job_id] = await enqueued(db)
    [first] = await claim(db, "a")
    async with db.connection() as conn:
        await outbox.reschedule(conn, first, owner="a", delay_seconds=3600, error="HTTP 503")
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, job_id)
        assert job is not None
        await store_jobs.apply(conn, job, store_jobs.JobUpdate(event=Event(Status.CANCELLED),
                                                               source="user"))
        await outbox.enqueue(conn, job_id, "cancel", {"job_id": job_id})

    # the generate row (its job ended) comes first, an hour early; the cancel waits for it
    [generate] = await claim(db, "a")
    assert (generate.action, generate.job_status) == ("generate", Status.CANCELLED)
    assert await claim(db, "a") == []
    async with db.connection() as conn:
        assert await outbox.mark_failed(conn, generate, owner="a", error="not sent")
    [cancel] = await claim(db, "a")
    assert cancel.action == "cancel"


async def test_next_due_says_when_the_next_row_may_be_claimed(db: Database) -> None:
    async with db.connection() as conn:
        assert await outbox.next_due_in(conn) is None
    await enqueued(db)
    [claimed] = await claim(db, "a")
    async with db.connection() as conn:
        assert 55 < (await outbox.next_due_in(conn) or 0) <= 60  # the lease's end
        await outbox.reschedule(conn, claimed, owner="a", delay_seconds=30, error="HTTP 500")
        assert 25 < (await outbox.next_due_in(conn) or 0) <= 30


async def test_the_dispatchers_bookkeeping_commits_without_waiting_for_its_flush(
    db: Database,
) -> None:
    """A lease, a reschedule and an accepted call may be forgotten by a crash (the row is
    sent again under the same key): their transactions commit without waiting for the
    flush, and the setting ends with them."""
    await enqueued(db)
    update = store_jobs.JobUpdate(event=Event(Status.QUEUED), source="delivery")
    async with db.connection() as conn:
        async with conn.transaction():
            rows = await outbox.claim(conn, owner="w", lease_seconds=60, limit=10)
            assert len(rows) == 1
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        async with conn.transaction():
            assert await outbox.reschedule(conn, rows[0], owner="w", delay_seconds=0,
                                           error="x")
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        (again,) = await outbox.claim(conn, owner="w", lease_seconds=60, limit=10)
        async with conn.transaction():
            done = await outbox.delivered_and_apply(conn, again, update)
            assert done not in (None, False)
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
