"""Jobs in the database: finding and locking a job, and applying events to it.

`apply` is the one place where a job changes: the receiver, delivery, cancel, timeouts and
the reconciler's replay all go through it, inside their own transaction, with the job's row
locked. It asks the pure state machine what to do and writes exactly that: the new status,
an event row (the SSE stream and history), a NOTIFY, and on a terminal transition the files
and the owner's notification.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.state import Event, JobState, Status, Transition, transition

NOTIFY_CHANNEL = "sorami_job_events"

_JOB_COLUMNS = (
    "j.id, j.kind, j.user_id, j.status, j.progress, j.seq, j.created_at, j.first_webhook_at"
)


@dataclasses.dataclass(frozen=True, slots=True)
class LockedJob:
    id: str
    kind: Kind
    user_id: str
    state: JobState
    seq: int
    created_at: dt.datetime
    first_webhook_at: dt.datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> LockedJob:
        return cls(
            id=r["id"],
            kind=Kind(r["kind"]),
            user_id=r["user_id"],
            state=JobState(Status(r["status"]), r["progress"]),
            seq=r["seq"],
            created_at=r["created_at"],
            first_webhook_at=r["first_webhook_at"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class FileRecord:
    url: str
    storage_key: str | None = None
    filename: str | None = None
    format: str | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    description: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class JobUpdate:
    """An event plus what it carries, as the state machine and the store need it."""

    event: Event
    source: str
    message: str | None = None
    error_message: str | None = None
    files: Sequence[FileRecord] = ()
    model_name: str | None = None
    generation_time_seconds: float | None = None
    from_webhook: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    """What `apply` did."""

    transition: Transition
    seq: int
    notification_id: int | None = None


LOCK_BY_ID = f"""
SELECT {_JOB_COLUMNS} FROM jobs j WHERE j.id = $1 FOR UPDATE
"""

# Our own id first, else an alias the backend's answer or the reconciler recorded.
LOCK_BY_BACKEND_ID = f"""
SELECT {_JOB_COLUMNS}
FROM jobs j
WHERE j.kind = $2
  AND (j.id = $1 OR j.id = (SELECT a.job_id FROM job_aliases a
                            WHERE a.kind = $2 AND a.backend_job_id = $1))
ORDER BY j.id = $1 DESC
LIMIT 1
FOR UPDATE OF j
"""

APPLY = """
WITH updated AS (
    UPDATE jobs SET
        status = $2,
        progress = $3,
        message = COALESCE($4, message),
        error_message = COALESCE($5, error_message),
        model_name = COALESCE($6, model_name),
        generation_time_seconds = COALESCE($7, generation_time_seconds),
        first_webhook_at = CASE WHEN $8 THEN COALESCE(first_webhook_at, now())
                                ELSE first_webhook_at END,
        finished_at = CASE WHEN $9 THEN now() ELSE finished_at END,
        seq = seq + 1,
        updated_at = now()
    WHERE id = $1
    RETURNING id, seq, status, progress, message
), event AS (
    INSERT INTO job_events (job_id, seq, status, progress, message, source)
    SELECT id, seq, status, progress, message, $10 FROM updated
)
SELECT seq, pg_notify('sorami_job_events', id || ':' || seq) FROM updated
"""

INSERT_FILES = """
INSERT INTO job_files (job_id, position, url, storage_key, filename, format, size_bytes,
                       width, height, duration_seconds, description)
SELECT $1, f.* FROM unnest($2::smallint[], $3::text[], $4::text[], $5::text[], $6::text[],
                           $7::bigint[], $8::int[], $9::int[], $10::float8[], $11::text[]) AS f
ON CONFLICT (job_id, position) DO NOTHING
"""

INSERT_NOTIFICATION = """
INSERT INTO notifications (user_id, job_id, type, title, message, metadata)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT ON CONSTRAINT notifications_once DO NOTHING
RETURNING id
"""


async def lock(conn: asyncpg.Connection, job_id: str) -> LockedJob | None:
    """Lock a job by our id (delivery, cancel, timeouts)."""
    row = await conn.fetchrow(LOCK_BY_ID, job_id)
    return LockedJob.from_record(row) if row else None


async def lock_for_backend_id(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str
) -> LockedJob | None:
    """Lock the job a webhook's job_id names: our id, or an alias of it."""
    row = await conn.fetchrow(LOCK_BY_BACKEND_ID, backend_job_id, kind.value)
    return LockedJob.from_record(row) if row else None


async def apply(conn: asyncpg.Connection, job: LockedJob, update: JobUpdate) -> Applied:
    """Apply one event to a locked job; the caller owns the transaction."""
    step = transition(job.state, update.event)
    if not step.applied:
        return Applied(step, job.seq)
    new = step.state
    seq = await conn.fetchval(
        APPLY,
        job.id,
        new.status.value,
        new.progress,
        update.message,
        update.error_message if new.status is Status.FAILED else None,
        update.model_name,
        update.generation_time_seconds,
        update.from_webhook,
        step.finished,
        update.source,
    )
    notification_id = None
    if step.finished:
        if new.status is Status.COMPLETED and update.files:
            await _insert_files(conn, job.id, update.files)
        notification_id = await _notify_owner(conn, job, new.status, update)
    return Applied(step, seq, notification_id)


async def _insert_files(conn: asyncpg.Connection, job_id: str, files: Sequence[FileRecord]) -> None:
    columns: list[list[Any]] = [[] for _ in range(10)]
    for position, f in enumerate(files):
        values = (
            position,
            f.url,
            f.storage_key,
            f.filename,
            f.format,
            f.size_bytes,
            f.width,
            f.height,
            f.duration_seconds,
            f.description,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    await conn.execute(INSERT_FILES, job_id, *columns)


_TITLES = {
    Status.COMPLETED: "{noun} ready",
    Status.FAILED: "{noun} generation failed",
    Status.TIMED_OUT: "{noun} generation timed out",
}


async def _notify_owner(
    conn: asyncpg.Connection, job: LockedJob, status: Status, update: JobUpdate
) -> int | None:
    """One notification per job and terminal type (the constraint makes repeats no-ops)."""
    if status not in _TITLES:
        return None  # the user cancelled it themselves
    noun = "Images" if job.kind is Kind.IMAGE else "Videos"
    if status is Status.COMPLETED:
        count = len(update.files)
        message = f"{count} {job.kind.value}(s) created."
    elif status is Status.FAILED:
        message = update.error_message or update.message or "The generator reported a failure."
    else:
        message = update.message or "The generator stopped reporting progress."
    notification_id: int | None = await conn.fetchval(
        INSERT_NOTIFICATION,
        job.user_id,
        job.id,
        f"{job.kind.label}_{status.value}",
        _TITLES[status].format(noun=noun),
        message,
        {"job_id": job.id, "kind": job.kind.value, "files": len(update.files)},
    )
    return notification_id
