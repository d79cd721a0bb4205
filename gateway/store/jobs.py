"""Jobs in the database: finding and locking a job, and applying events to it.

`apply` is the one place where a job changes: the receiver, delivery, cancel, timeouts and
the reconciler's replay all go through it, inside their own transaction, with the job's row
locked. It asks the pure state machine what to do and writes exactly that: the new status,
an event row (the SSE stream and history), a NOTIFY, and on a terminal transition the files
and the owner's notification.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.notifications import owner_notification
from gateway.jobs.records import FileRecord, JobUpdate, LockedJob
from gateway.jobs.state import JobState, Status, Transition, transition
from gateway.store.database import json_text
from gateway.store.errors import StoreError
from gateway.store.statements import Statement

NOTIFY_CHANNEL = "sorami_job_events"
# The wake-up of live listeners for a changed job (see gateway.store.events). PostgreSQL
# serializes the commits of transactions that NOTIFY (they queue for one lock, held until
# the commit is flushed): statements that change jobs commit one after the other, each
# after its own flush, however many connections send them (`bench ingest` measures it).
NOTIFY_CALL = "pg_notify('" + NOTIFY_CHANNEL + "', id || ':' || seq)"

JOB_COLUMNS = (
    "j.id, j.kind, j.user_id, j.status, j.progress, j.seq, j.created_at, j.first_webhook_at"
)


def locked_job(r: asyncpg.Record, *, id_column: str = "id") -> LockedJob:
    """The job of a row read with JOB_COLUMNS; `id_column` names the job's id where `id`
    is another table's."""
    return LockedJob(
        id=r[id_column],
        kind=Kind(r["kind"]),
        user_id=r["user_id"],
        state=JobState(Status(r["status"]), r["progress"]),
        seq=r["seq"],
        created_at=r["created_at"],
        first_webhook_at=r["first_webhook_at"],
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    """What `apply` did."""

    transition: Transition
    seq: int
    notification_id: int | None = None


LOCK_BY_ID = f"""
SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1 FOR UPDATE
"""

def by_backend_id(backend_id: str, kind: str) -> str:
    """The job a webhook's job_id names, given the parameters holding it and the kind: our own
    id first, else an alias the backend's answer or the reconciler recorded."""
    return f"""
SELECT {JOB_COLUMNS}
FROM jobs j
WHERE j.kind = {kind}
  AND (j.id = {backend_id} OR j.id = (SELECT a.job_id FROM job_aliases a
                            WHERE a.kind = {kind} AND a.backend_job_id = {backend_id}))
ORDER BY j.id = {backend_id} DESC
LIMIT 1
"""


LOCK_BY_BACKEND_ID = by_backend_id("$1", "$2") + "FOR UPDATE OF j\n"

# Every job of a batch that changed: its final row, its event rows (consecutive seqs), and
# one NOTIFY per job (listeners re-read job_events after the seq they have). The event rows
# read the jobs' messages before the UPDATE (one statement, one snapshot) to fill a message
# the event itself does not carry, exactly as one UPDATE per event would. The seq guard
# makes a job changed since it was locked fail loudly instead of writing over it. Rows are
# found through their index (`= ANY`, scalar subqueries): a join with the unnest would
# read whole tables once per batch.
APPLY_MANY = """
WITH changes AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::job_status[], $5::smallint[],
                         $6::text[], $7::text[], $8::text[], $9::float8[], $10::bool[],
                         $11::bool[])
        AS c(id, seq_before, seq, status, progress, message, error_message, model_name,
             generation_time_seconds, from_webhook, finished)
), events AS (
    INSERT INTO job_events (job_id, seq, status, progress, message, source)
    SELECT e.job_id, e.seq, e.status, e.progress,
           COALESCE(e.message, (SELECT j.message FROM jobs j WHERE j.id = e.job_id)), e.source
    FROM unnest($12::text[], $13::int[], $14::job_status[], $15::smallint[], $16::text[],
                $17::text[]) AS e(job_id, seq, status, progress, message, source)
), updated AS (
    UPDATE jobs j SET
        status = c.status,
        progress = c.progress,
        message = COALESCE(c.message, j.message),
        error_message = COALESCE(c.error_message, j.error_message),
        model_name = COALESCE(c.model_name, j.model_name),
        generation_time_seconds = COALESCE(c.generation_time_seconds,
                                           j.generation_time_seconds),
        first_webhook_at = CASE WHEN c.from_webhook THEN COALESCE(j.first_webhook_at, now())
                                ELSE j.first_webhook_at END,
        finished_at = CASE WHEN c.finished THEN now() ELSE j.finished_at END,
        seq = c.seq,
        updated_at = now()
    FROM changes c
    WHERE j.id = ANY($1::text[]) AND j.id = c.id AND j.seq = c.seq_before
    RETURNING j.id, j.seq
)
SELECT id, """ + NOTIFY_CALL + """ FROM updated
"""

INSERT_FILES = """
INSERT INTO job_files (job_id, position, url, storage_key, filename, format, size_bytes,
                       width, height, duration_seconds, description)
SELECT f.* FROM unnest($1::text[], $2::smallint[], $3::text[], $4::text[], $5::text[],
                       $6::text[], $7::bigint[], $8::int[], $9::int[], $10::float8[],
                       $11::text[]) AS f
ON CONFLICT (job_id, position) DO NOTHING
"""

# Metadata as JSON text: asyncpg's jsonb codec does not reach inside arrays.
INSERT_NOTIFICATIONS = """
INSERT INTO notifications (user_id, job_id, type, title, message, metadata)
SELECT n.user_id, n.job_id, n.type, n.title, n.message,
       n.metadata::jsonb || jsonb_build_object('job_id', n.job_id)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
    WITH ORDINALITY AS n(user_id, job_id, type, title, message, metadata, i)
ORDER BY n.i
ON CONFLICT ON CONSTRAINT notifications_once DO NOTHING
RETURNING id, job_id, type
"""

# The parameters of APPLY, named in the parts below: the job, its new state and what the
# event carries.
APPLY_PARAMS = (
    "job_id", "status", "progress", "message", "error_message", "model_name",
    "generation_time_seconds", "from_webhook", "finished", "source",
)
# APPLY_FINISHED's after APPLY's: the files, one array per column (empty for none), and the
# owner's notification (none when note_type is NULL).
FINISHED_PARAMS = (
    "file_positions", "file_urls", "file_storage_keys", "file_filenames", "file_formats",
    "file_size_bytes", "file_widths", "file_heights", "file_durations", "file_descriptions",
    "note_type", "note_title", "note_message", "note_metadata",
)


def _apply_ctes(guard: str = "", target: str = "$job_id", progress: str = "$progress") -> str:
    """The job's new state and its event row: the common table expressions of APPLY and of
    the statements `guarded` makes. `guard` narrows the UPDATE; `target` names the job and
    `progress` is the new progress, unless the statement decides them itself."""
    return f"""
updated AS (
    UPDATE jobs SET
        status = $status,
        progress = {progress},
        message = COALESCE($message, message),
        error_message = COALESCE($error_message, error_message),
        model_name = COALESCE($model_name, model_name),
        generation_time_seconds = COALESCE($generation_time_seconds, generation_time_seconds),
        first_webhook_at = CASE WHEN $from_webhook THEN COALESCE(first_webhook_at, now())
                                ELSE first_webhook_at END,
        finished_at = CASE WHEN $finished THEN now() ELSE finished_at END,
        seq = seq + 1,
        updated_at = now()
    WHERE id = {target}{guard}
    RETURNING id, seq, status, progress, message, user_id
), event AS (
    INSERT INTO job_events (job_id, seq, status, progress, message, source)
    SELECT id, seq, status, progress, message, $source FROM updated
)"""


# A terminal transition's files and the owner's notification (the metadata gets the job's
# id here), each made once by its constraint however often the event is delivered.
_FINISHED_CTES = """, files AS (
    INSERT INTO job_files (job_id, position, url, storage_key, filename, format, size_bytes,
                           width, height, duration_seconds, description)
    SELECT updated.id, f.*
    FROM updated, unnest($file_positions::smallint[], $file_urls::text[],
                         $file_storage_keys::text[], $file_filenames::text[],
                         $file_formats::text[], $file_size_bytes::bigint[],
                         $file_widths::int[], $file_heights::int[], $file_durations::float8[],
                         $file_descriptions::text[]) AS f
    ON CONFLICT (job_id, position) DO NOTHING
), notification AS (
    INSERT INTO notifications (user_id, job_id, type, title, message, metadata)
    SELECT updated.user_id, updated.id, $note_type::text, $note_title, $note_message,
           $note_metadata::jsonb || jsonb_build_object('job_id', updated.id)
    FROM updated WHERE $note_type::text IS NOT NULL
    ON CONFLICT ON CONSTRAINT notifications_once DO NOTHING
    RETURNING id
)"""


APPLY = Statement.compose(
    "APPLY",
    "One applied event of a job locked by the caller: its new state, its event row, the\n"
    "NOTIFY. Returns the job's new seq.",
    "WITH" + _apply_ctes() + f"""
SELECT seq, {NOTIFY_CALL} FROM updated
""",
    APPLY_PARAMS,
)

APPLY_FINISHED = Statement.compose(
    "APPLY_FINISHED",
    "APPLY of a terminal event, with the job's files and its owner's notification, in the\n"
    "same single statement. Returns the new seq and the notification's id.",
    "WITH" + _apply_ctes() + _FINISHED_CTES + f"""
SELECT seq, {NOTIFY_CALL}, (SELECT id FROM notification) AS notification_id
FROM updated
""",
    APPLY_PARAMS + FINISHED_PARAMS,
)


def guarded(
    finished: bool,
    ctes: str,
    guard: str,
    columns: str = "",
    *,
    target: str = "$job_id",
    progress: str = "$progress",
    source: str = "",
) -> str:
    """APPLY's text (or APPLY_FINISHED's) after the caller's common table expressions `ctes`,
    writing only when `guard` (a condition on them) holds, for `Statement.compose`. One row
    (one per row of `source`, a FROM clause, when given): the caller's `columns`, then `seq`
    and `notification_id`, NULL when nothing was written. `target` and `progress` are as in
    `_apply_ctes`."""
    notification = "(SELECT id FROM notification)" if finished else "NULL::bigint"
    return (
        "WITH" + ctes + "," + _apply_ctes(f" AND {guard}", target, progress)
        + (_FINISHED_CTES if finished else "")
        + f"""
SELECT {columns}(SELECT seq FROM updated) AS seq,
       (SELECT {NOTIFY_CALL} FROM updated) AS notified,
       {notification} AS notification_id
{source}"""
    )


def apply_values(job: LockedJob, update: JobUpdate, step: Transition) -> dict[str, Any]:
    """The parameters of APPLY, or of APPLY_FINISHED when `step` finishes the job, for an
    applied step, by name."""
    return update_values(job.id, job.kind, update, step.state, step.finished)


def update_values(
    job_id: str, kind: Kind, update: JobUpdate, new: JobState, finished: bool
) -> dict[str, Any]:
    """APPLY's parameters (APPLY_FINISHED's when `finished`) that take the job `job_id` of
    `kind` to `new`, by name."""
    values: dict[str, Any] = {
        "job_id": job_id,
        "status": new.status.value,
        "progress": new.progress,
        "message": update.message,
        "error_message": update.error_message if new.status is Status.FAILED else None,
        "model_name": update.model_name,
        "generation_time_seconds": update.generation_time_seconds,
        "from_webhook": update.from_webhook,
        "finished": finished,
        "source": update.source,
    }
    if not finished:
        return values
    files = update.files if new.status is Status.COMPLETED else ()
    values.update(zip(FINISHED_PARAMS[:10], _file_columns(files), strict=True))
    note = owner_notification(kind, new.status, update)
    values.update(
        note_type=note.type if note else None,
        note_title=note.title if note else None,
        note_message=note.message if note else None,
        note_metadata=note.metadata if note else None,
    )
    return values


async def lock(conn: asyncpg.Connection, job_id: str) -> LockedJob | None:
    """Lock a job by our id (delivery, cancel, timeouts)."""
    row = await conn.fetchrow(LOCK_BY_ID, job_id)
    return locked_job(row) if row else None


# In id order, so that two transactions locking overlapping sets cannot deadlock (rows are
# locked after the sort).
LOCK_MANY = f"""
SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = ANY($1::text[]) ORDER BY j.id FOR UPDATE
"""


async def lock_many(conn: asyncpg.Connection, job_ids: Sequence[str]) -> dict[str, LockedJob]:
    """Lock the jobs that exist among `job_ids`, in id order; keyed by id."""
    rows = await conn.fetch(LOCK_MANY, list(job_ids))
    return {r["id"]: locked_job(r) for r in rows}


async def lock_for_backend_id(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str
) -> LockedJob | None:
    """Lock the job a webhook's job_id names: our id, or an alias of it."""
    row = await conn.fetchrow(LOCK_BY_BACKEND_ID, backend_job_id, kind.value)
    return locked_job(row) if row else None


async def apply(conn: asyncpg.Connection, job: LockedJob, update: JobUpdate) -> Applied:
    """Apply one event to a locked job; the caller owns the transaction. One statement:
    the webhook hot path. `apply_many` writes the same rows for batches (a test compares)."""
    step = transition(job.state, update.event)
    if not step.applied:
        return Applied(step, job.seq)
    values = apply_values(job, update, step)
    if not step.finished:
        seq = await conn.fetchval(APPLY.sql, *APPLY.args(values))
        return Applied(step, seq)
    row = await conn.fetchrow(APPLY_FINISHED.sql, *APPLY_FINISHED.args(values))
    assert row is not None, "the locked job disappeared"
    return Applied(step, row["seq"], row["notification_id"])


def _file_columns(files: Sequence[FileRecord]) -> list[list[Any]]:
    """The files as one list per column, positions first (unnest makes rows of them)."""
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
    return columns


@dataclasses.dataclass(frozen=True, slots=True)
class Replayed:
    """What `apply_many` did to one job: the job as it is now, and one Applied per update."""

    job: LockedJob
    applied: tuple[Applied, ...]


class _Columns:
    """Rows gathered column by column, for `unnest` arrays."""

    def __init__(self, width: int) -> None:
        self.columns: list[list[Any]] = [[] for _ in range(width)]

    def add(self, *values: Any) -> None:
        for column, value in zip(self.columns, values, strict=True):
            column.append(value)

    def __len__(self) -> int:
        return len(self.columns[0])


async def apply_many(
    conn: asyncpg.Connection, batch: Sequence[tuple[LockedJob, Sequence[JobUpdate]]]
) -> list[Replayed]:
    """Apply each locked job's updates in order, with a constant number of statements.

    The result, row for row, is what `apply` called once per update would write: the state
    machine decides every step in Python, then the jobs, their events, files and owner
    notifications are written set-based. The caller owns the transaction and has locked
    every job, each listed once.
    """
    changes, events = _Columns(11), _Columns(6)
    files, notes = _Columns(11), _Columns(6)
    # (job index, update index) of each notification row, to hand back its id
    note_of: list[tuple[int, int]] = []
    results: list[tuple[LockedJob, list[Applied]]] = []
    seen: set[str] = set()
    for index, (job, updates) in enumerate(batch):
        if job.id in seen:
            raise ValueError(f"job {job.id} listed twice in one batch")
        seen.add(job.id)
        state, seq = job.state, job.seq
        message = error_message = model_name = None
        generation_time: float | None = None
        from_webhook = finished = False
        applied: list[Applied] = []
        for position, update in enumerate(updates):
            step = transition(state, update.event)
            if not step.applied:
                applied.append(Applied(step, seq))
                continue
            state, seq = step.state, seq + 1
            # each UPDATE keeps a column whose value the event does not carry
            message = update.message if update.message is not None else message
            if state.status is Status.FAILED and update.error_message is not None:
                error_message = update.error_message
            if update.model_name is not None:
                model_name = update.model_name
            if update.generation_time_seconds is not None:
                generation_time = update.generation_time_seconds
            from_webhook = from_webhook or update.from_webhook
            events.add(job.id, seq, state.status.value, state.progress, message, update.source)
            if step.finished:
                finished = True
                if state.status is Status.COMPLETED:
                    for n, f in enumerate(update.files):
                        files.add(job.id, n, f.url, f.storage_key, f.filename, f.format,
                                  f.size_bytes, f.width, f.height, f.duration_seconds,
                                  f.description)
                note = owner_notification(job.kind, state.status, update)
                if note is not None:
                    notes.add(job.user_id, job.id, note.type, note.title, note.message,
                              json_text(note.metadata))
                    note_of.append((index, position))
            applied.append(Applied(step, seq))
        if seq != job.seq:
            changes.add(job.id, job.seq, seq, state.status.value, state.progress, message,
                        error_message, model_name, generation_time, from_webhook, finished)
        results.append((dataclasses.replace(job, state=state, seq=seq), applied))
    if changes:
        written = await conn.fetch(APPLY_MANY, *changes.columns, *events.columns)
        if len(written) != len(changes):
            raise StoreError("a job changed after it was locked; nothing was applied")
    if files:
        await conn.execute(INSERT_FILES, *files.columns)
    if notes:
        ids = {(r["job_id"], r["type"]): r["id"]
               for r in await conn.fetch(INSERT_NOTIFICATIONS, *notes.columns)}
        for (index, position), job_id, type_ in zip(note_of, notes.columns[1], notes.columns[2],
                                                    strict=True):
            if (job_id, type_) in ids:
                applied = results[index][1]
                applied[position] = dataclasses.replace(
                    applied[position], notification_id=ids[job_id, type_])
    return [Replayed(job, tuple(applied)) for job, applied in results]
