"""Rows arranged directly in the test database."""

from __future__ import annotations

import uuid

from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.jobs.records import JobUpdate
from gateway.jobs.state import Status
from gateway.store import Database
from gateway.store import jobs as store_jobs
from gateway.store.jobs import Applied


async def insert_job(
    db: Database,
    *,
    kind: Kind = Kind.IMAGE,
    user_id: str = "user_a",
    prompt: str = "a cat in sunglasses",
    status: Status = Status.QUEUED,
    progress: int = 0,
    job_id: str | None = None,
    created_ago_seconds: float = 0,
) -> str:
    job_id = job_id or str(uuid.uuid4())
    await db.execute(
        """
        INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, status, progress,
                          created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7,
                now() - make_interval(secs => $8), now() - make_interval(secs => $8))
        """,
        job_id,
        kind.value,
        user_id,
        prompt,
        normalize(prompt),
        status.value,
        progress,
        created_ago_seconds,
    )
    return job_id


async def apply_update(db: Database, job_id: str, update: JobUpdate) -> Applied:
    """Apply an update through the store's one path, on the test's own connection."""
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, job_id)
        assert job is not None
        return await store_jobs.apply(conn, job, update)


async def insert_notification(
    db: Database, *, user_id: str = "user_a", job_id: str | None = None,
    type: str = "IMAGE_COMPLETED", read: bool = False,
) -> int:
    notification_id: int = await db.fetchval(
        """
        INSERT INTO notifications (user_id, job_id, type, title, message, read_at)
        VALUES ($1, $2, $3, 'Images ready', '1 image(s) created.',
                CASE WHEN $4 THEN now() END)
        RETURNING id
        """,
        user_id, job_id, type, read,
    )
    return notification_id
