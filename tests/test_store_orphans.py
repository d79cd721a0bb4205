"""Orphans are kept whole and reach their job only through attach, in received order."""

from __future__ import annotations

import pytest

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode
from gateway.jobs.prompts import normalize
from gateway.store import Database, Duplicate, orphans
from gateway.store import jobs as store_jobs
from tests.factories import insert_job

HINTS = orphans.OrphanHints(user_id="user_a", prompt="A cat", prompt_norm=normalize("A cat"),
                            file_count=0)


def event(status: str, **extra: object) -> dict[str, object]:
    return {"job_id": "backend-1", "status": status, **extra}


async def record(db: Database, key: str, payload: dict[str, object]) -> None:
    async with db.transaction() as conn:
        await orphans.lock_backend_id(conn, Kind.IMAGE, "backend-1")
        await orphans.record(conn, Kind.IMAGE, "backend-1", dedupe_key=key,
                             event_status=str(payload["status"]), payload=payload, hints=HINTS)


async def attach(db: Database, job_id: str, source: str = "reconciler") -> orphans.Attached:
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, job_id)
        assert job is not None
        return await orphans.attach(conn, Kind.IMAGE, "backend-1", job, source=source)


async def test_events_are_grouped_per_backend_id(db: Database) -> None:
    await record(db, "k1", event("generating", progress=60))
    await record(db, "k2", event("completed", data={"images": [{"url": "https://cdn/1.png"}]}))
    row = await db.fetchrow("SELECT * FROM orphans")
    assert row is not None
    assert (row["state"], row["event_count"], row["user_id"], row["prompt_norm"]) == (
        "unresolved", 2, "user_a", "a cat")
    assert await db.fetchval("SELECT count(*) FROM orphan_events") == 2


async def test_attach_replays_in_received_order_and_resolves(db: Database) -> None:
    await record(db, "k2", event("completed", data={"images": [{"url": "https://cdn/1.png"}]}))
    await record(db, "k1", event("generating", progress=60))
    job_id = await insert_job(db)
    result = await attach(db, job_id)
    # completed arrived first, so the later generating event is stale
    assert [t.outcome for t in result.transitions] == ["applied", "stale"]
    assert len(result.notification_ids) == 1
    job = await db.fetchrow("SELECT status, progress FROM jobs WHERE id = $1", job_id)
    assert job is not None
    assert (job["status"], job["progress"]) == ("COMPLETED", 100)
    orphan = await db.fetchrow("SELECT state, job_id FROM orphans")
    assert orphan is not None
    assert (orphan["state"], orphan["job_id"]) == ("matched", job_id)
    assert await db.fetchval("SELECT count(*) FROM orphan_events WHERE applied_at IS NULL") == 0
    again = await attach(db, job_id)
    assert again.transitions == ()


async def test_a_backend_id_never_reaches_a_second_job(db: Database) -> None:
    await record(db, "k1", event("generating", progress=60))
    first = await insert_job(db)
    second = await insert_job(db, user_id="user_b")
    await attach(db, first)
    with pytest.raises(Duplicate):
        await attach(db, second)
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", second) == "QUEUED"


async def test_stored_payloads_decode_like_fresh_ones(db: Database) -> None:
    body = event("failed", error_message="quota", extra_field={"kept": True})
    await record(db, "k1", body)
    stored = await db.fetchval("SELECT payload FROM orphan_events")
    assert stored == body  # unknown fields kept whole
    assert decode(b'{"job_id": "backend-1", "status": "failed"}').job_status == "FAILED"


async def test_an_orphan_recorded_during_attach_waits_and_then_sees_the_alias(
    db: Database,
) -> None:
    import asyncio

    job_id = await insert_job(db)
    async with db.transaction() as attaching:
        job = await store_jobs.lock(attaching, job_id)
        assert job is not None
        await orphans.attach(attaching, Kind.IMAGE, "backend-1", job, source="delivery")

        async def receiver() -> str | None:
            async with db.transaction() as conn:
                await orphans.lock_backend_id(conn, Kind.IMAGE, "backend-1")
                found = await store_jobs.lock_for_backend_id(conn, Kind.IMAGE, "backend-1")
                return found.id if found else None

        waiting = asyncio.create_task(receiver())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # blocked on the backend id's lock until attach commits
    assert await waiting == job_id
