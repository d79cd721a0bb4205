"""Rows arranged directly in the test database."""

from __future__ import annotations

import uuid

from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.jobs.state import Status
from gateway.store import Database


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
