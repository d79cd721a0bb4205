"""Stale jobs: active jobs unchanged for longer than their kind's timeout become TIMED_OUT,
through the state machine, in keyset batches."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.records import JobUpdate
from gateway.jobs.state import Event, Status
from gateway.store import jobs as store_jobs
from gateway.store.admission import WAITING
from gateway.store.database import commit_without_flush
from gateway.store.statuses import TERMINAL_LIST

# stale jobs: no change for longer than their kind's timeout become TIMED_OUT

# A job whose generate call waits for admission (BACKEND_MAX_IN_FLIGHT_*) was never handed
# to the backend: it is not silent, it waits its turn, and timing it out would end it
# unsent. Read through outbox_once (job_id, action).
_NOT_WAITING_FOR_ADMISSION = """NOT EXISTS (
    SELECT 1 FROM outbox o
    WHERE o.job_id = {job}.id AND o.action = 'generate' AND """ + WAITING + ")"

# The predicate matches the partial index jobs_active_updated word for word.
STALE_JOBS = f"""
SELECT id, updated_at FROM jobs
WHERE kind = $1 AND status NOT IN {TERMINAL_LIST}
  AND updated_at < $2
  AND (updated_at, id) > ($3, $4)
  AND {_NOT_WAITING_FOR_ADMISSION.format(job="jobs")}
ORDER BY updated_at, id
LIMIT $5
"""

COUNT_STALE_JOBS = f"""
SELECT count(*) FROM jobs
WHERE kind = $1 AND status NOT IN {TERMINAL_LIST}
  AND updated_at < $2
  AND {_NOT_WAITING_FOR_ADMISSION.format(job="jobs")}
"""

# Locks the jobs still active and unchanged since the cutoff (a row updated meanwhile is
# re-checked against the WHERE clause once its lock is granted); a job whose row is busy
# right now is being heard from, so it is skipped rather than waited for.
LOCK_STALE_JOBS = f"""
SELECT {store_jobs.JOB_COLUMNS} FROM jobs j
WHERE j.id = ANY($1::text[]) AND j.updated_at < $2
  AND j.status NOT IN {TERMINAL_LIST}
  AND {_NOT_WAITING_FOR_ADMISSION.format(job="j")}
ORDER BY j.id
FOR UPDATE SKIP LOCKED
"""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


async def stale_jobs(
    conn: asyncpg.Connection, kind: Kind, cutoff: dt.datetime, *, batch: int = 100
) -> AsyncIterator[list[str]]:
    """Ids of active jobs of `kind` unchanged since before `cutoff`, in keyset batches."""
    after: tuple[dt.datetime, str] = (_EPOCH, "")
    while True:
        rows = await conn.fetch(STALE_JOBS, kind.value, cutoff, *after, batch)
        if rows:
            yield [r["id"] for r in rows]
        if len(rows) < batch:
            return
        after = (rows[-1]["updated_at"], rows[-1]["id"])


async def count_stale_jobs(conn: asyncpg.Connection, kind: Kind, cutoff: dt.datetime) -> int:
    count: int = await conn.fetchval(COUNT_STALE_JOBS, kind.value, cutoff)
    return count


async def time_out(
    conn: asyncpg.Connection, job_ids: list[str], cutoff: dt.datetime, message: str
) -> int:
    """Time out, in the caller's transaction, those of `job_ids` still active and unchanged
    since `cutoff`, each through the state machine (which notifies its owner), written in
    bulk by `jobs.apply_many`; returns how many."""
    update = JobUpdate(event=Event(Status.TIMED_OUT), source="timeout", message=message)
    # a crash may forget the commit: the next run times the same jobs out again
    await commit_without_flush(conn)
    rows = await conn.fetch(LOCK_STALE_JOBS, job_ids, cutoff)
    replayed = await store_jobs.apply_many(
        conn, [(store_jobs.locked_job(row), (update,)) for row in rows]
    )
    return sum(r.applied[0].transition.applied for r in replayed)
