"""The one path that changes a job: state machine decisions written to PostgreSQL."""

from __future__ import annotations

import asyncio

from gateway.jobs.kinds import Kind
from gateway.jobs.records import FileRecord, JobUpdate
from gateway.jobs.state import Event, Outcome, Status
from gateway.store import Database
from gateway.store import jobs as store_jobs
from tests.factories import insert_job

FILES = (
    FileRecord(url="https://cdn/1.png", storage_key="images/x/image_1.png", format="PNG",
               size_bytes=10, width=1024, height=1024),
    FileRecord(url="https://cdn/2.png", storage_key="images/x/image_2.png", format="PNG",
               size_bytes=11, width=1024, height=1024),
)


async def apply(db: Database, job_id: str, update: JobUpdate) -> store_jobs.Applied:
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, job_id)
        assert job is not None
        return await store_jobs.apply(conn, job, update)


def completed(files: tuple[FileRecord, ...] = FILES) -> JobUpdate:
    return JobUpdate(Event(Status.COMPLETED, 100), source="webhook", message="done",
                     files=files, model_name="gemini-2.5-flash-image",
                     generation_time_seconds=12.5, from_webhook=True)


async def test_completion_stores_files_and_one_notification(db: Database) -> None:
    job_id = await insert_job(db)
    first = await apply(db, job_id, completed())
    again = await apply(db, job_id, completed())
    assert first.transition.outcome is Outcome.APPLIED
    assert first.notification_id is not None
    assert again.transition.outcome is Outcome.STALE
    job = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert job is not None
    assert (job["status"], job["progress"], job["model_name"]) == (
        "COMPLETED", 100, "gemini-2.5-flash-image")
    assert job["finished_at"] is not None
    assert job["first_webhook_at"] is not None
    assert await db.fetchval("SELECT count(*) FROM job_files WHERE job_id = $1", job_id) == 2
    notes = await db.fetch("SELECT type, user_id FROM notifications WHERE job_id = $1", job_id)
    assert [(n["type"], n["user_id"]) for n in notes] == [("IMAGE_COMPLETED", "user_a")]


async def test_every_applied_change_is_an_event_with_the_next_seq(db: Database) -> None:
    job_id = await insert_job(db, status=Status.PENDING)
    for status, progress in [(Status.QUEUED, 0), (Status.GENERATING, 60),
                             (Status.INITIALIZING, 25), (Status.SAVING, 90)]:
        await apply(db, job_id, JobUpdate(Event(status, progress), source="test"))
    events = await db.fetch(
        "SELECT seq, status, progress FROM job_events WHERE job_id = $1 ORDER BY seq", job_id)
    assert [(e["seq"], e["status"], e["progress"]) for e in events] == [
        (2, "QUEUED", 0), (3, "GENERATING", 60), (4, "SAVING", 90)]
    assert await db.fetchval("SELECT seq FROM jobs WHERE id = $1", job_id) == 4


async def test_failure_keeps_the_error_and_notifies_once(db: Database) -> None:
    job_id = await insert_job(db, kind=Kind.VIDEO)
    update = JobUpdate(Event(Status.FAILED), source="webhook",
                       error_message="Quota API dépassé", message="La génération a échoué")
    await apply(db, job_id, update)
    await apply(db, job_id, update)
    row = await db.fetchrow("SELECT status, error_message FROM jobs WHERE id = $1", job_id)
    assert row is not None
    assert (row["status"], row["error_message"]) == (
        "FAILED", "Quota API dépassé")
    types = await db.fetch("SELECT type, message FROM notifications WHERE job_id = $1", job_id)
    assert [(t["type"], t["message"]) for t in types] == [("VIDEO_FAILED", "Quota API dépassé")]


async def test_completion_after_timeout_completes_the_job(db: Database) -> None:
    job_id = await insert_job(db, status=Status.GENERATING, progress=40)
    await apply(db, job_id, JobUpdate(Event(Status.TIMED_OUT), source="timeout"))
    done = await apply(db, job_id, completed())
    assert done.transition.outcome is Outcome.APPLIED
    types = {r["type"] for r in await db.fetch(
        "SELECT type FROM notifications WHERE job_id = $1", job_id)}
    assert types == {"IMAGE_TIMED_OUT", "IMAGE_COMPLETED"}
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "COMPLETED"


async def test_alias_lookup_finds_the_job_only_for_its_kind(db: Database) -> None:
    job_id = await insert_job(db)
    await db.execute(
        "INSERT INTO job_aliases (kind, backend_job_id, job_id, source) "
        "VALUES ('image', 'backend-uuid', $1, 'delivery')", job_id)
    async with db.transaction() as conn:
        direct = await store_jobs.lock_for_backend_id(conn, Kind.IMAGE, job_id)
        aliased = await store_jobs.lock_for_backend_id(conn, Kind.IMAGE, "backend-uuid")
        wrong_kind = await store_jobs.lock_for_backend_id(conn, Kind.VIDEO, "backend-uuid")
        unknown = await store_jobs.lock_for_backend_id(conn, Kind.IMAGE, "nope")
    assert direct is not None
    assert direct.id == job_id
    assert aliased is not None
    assert aliased.id == job_id
    assert wrong_kind is None
    assert unknown is None


async def test_concurrent_completions_serialize_on_the_row_lock(db: Database) -> None:
    job_id = await insert_job(db)
    results = await asyncio.gather(*(apply(db, job_id, completed()) for _ in range(3)))
    assert sorted(r.transition.outcome for r in results) == ["applied", "stale", "stale"]
    assert await db.fetchval("SELECT count(*) FROM job_files WHERE job_id = $1", job_id) == 2
    assert await db.fetchval(
        "SELECT count(*) FROM notifications WHERE job_id = $1", job_id) == 1


async def test_a_deadlock_is_a_retryable_unavailability(db: Database) -> None:
    from gateway.store import StoreUnavailable

    first, second = await insert_job(db), await insert_job(db)
    both_locked_one = asyncio.Event()

    async def lock_in_order(a: str, b: str) -> None:
        async with db.transaction() as conn:
            await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", a)
            await both_locked_one.wait()
            await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", b)

    tasks = [asyncio.create_task(lock_in_order(first, second)),
             asyncio.create_task(lock_in_order(second, first))]
    await asyncio.sleep(0.2)
    both_locked_one.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(r, StoreUnavailable) for r in results) == 1
    assert sum(r is None for r in results) == 1


async def test_a_connection_returns_to_the_pool_without_an_open_transaction(
    db: Database,
) -> None:
    async with db.connection() as conn:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
    async with db.connection() as conn:
        assert not conn.is_in_transaction()
