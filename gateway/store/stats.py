"""Operational figures read from the database for the metrics endpoint.

Each query is an index-only scan over a small part of a table (partial indexes on active
jobs, due outbox rows, open orphans, succeeded reconcile runs), so a scrape stays cheap at
millions of jobs. Counting finished jobs has to visit every finished row; it is a separate
query that callers run less often. Ages are computed with the database's clock, the one
that wrote the timestamps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import asyncpg

from gateway.store.admission import WAITING
from gateway.store.statuses import TERMINAL_LIST

# The predicate matches the partial index jobs_active_status (0006) word for word, so the
# planner can use it.
ACTIVE_SNAPSHOT = f"""
SELECT
    (SELECT coalesce(jsonb_agg(jsonb_build_array(kind, status, n, age)), '[]'::jsonb)
     FROM (SELECT kind::text, status::text, count(*) AS n,
                  extract(epoch FROM now() - min(updated_at))::float8 AS age
           FROM jobs
           WHERE status NOT IN {TERMINAL_LIST}
           GROUP BY kind, status) AS active) AS active_jobs,
    outbox.due,
    outbox.pending,
    outbox.oldest_due_age,
    (SELECT coalesce(jsonb_agg(jsonb_build_array(kind, n, age)), '[]'::jsonb)
     FROM (SELECT kind::text, count(*) AS n,
                  extract(epoch FROM now() - min(first_seen_at))::float8 AS age
           FROM orphans
           WHERE state IN ('unresolved', 'unmatched')
           GROUP BY kind) AS open) AS open_orphans,
    (SELECT coalesce(jsonb_agg(jsonb_build_array(kind, reason, n)), '[]'::jsonb)
     FROM (SELECT kind::text, coalesce(review_reason, 'undecided') AS reason, count(*) AS n
           FROM orphans
           WHERE state IN ('unresolved', 'unmatched')
           GROUP BY kind, review_reason) AS why) AS open_orphan_reasons,
    (SELECT coalesce(jsonb_agg(jsonb_build_array(kind, n, age)), '[]'::jsonb)
     FROM (SELECT j.kind::text, count(*) AS n,
                  extract(epoch FROM now() - min(o.created_at))::float8 AS age
           FROM outbox o JOIN jobs j ON j.id = o.job_id
           WHERE {WAITING}
           GROUP BY j.kind) AS waiting) AS admission_waiting,
    (SELECT extract(epoch FROM max(finished_at))::float8
     FROM reconcile_runs
     WHERE state = 'succeeded' AND NOT dry_run) AS last_reconcile
FROM (
    SELECT count(*) FILTER (WHERE due_at <= now()) AS due,
           count(*) AS pending,
           extract(epoch FROM now() - min(due_at) FILTER (WHERE due_at <= now()))::float8
               AS oldest_due_age
    FROM outbox
    WHERE delivered_at IS NULL AND failed_at IS NULL
) AS outbox
"""

FINISHED_JOB_COUNTS = f"""
SELECT kind::text, status::text, count(*) AS n
FROM jobs
WHERE status IN {TERMINAL_LIST}
GROUP BY kind, status
"""


@dataclasses.dataclass(frozen=True, slots=True)
class ActiveJobs:
    kind: str
    status: str
    count: int
    oldest_update_age_seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Backlog:
    """Things of one kind waiting: how many, and how long the oldest has waited."""

    kind: str
    count: int
    oldest_age_seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class ActiveSnapshot:
    """What is in flight now: active jobs, the outbox, open orphans, the reconciler."""

    active_jobs: tuple[ActiveJobs, ...]
    outbox_due: int
    outbox_pending: int
    outbox_oldest_due_age_seconds: float | None
    open_orphans: tuple[Backlog, ...]
    last_reconcile_success: float | None
    # (kind, the latest decision's outcome or "undecided", how many)
    open_orphan_reasons: tuple[tuple[str, str, int], ...] = ()
    # jobs whose delivery waits for admission toward the backend (BACKEND_MAX_IN_FLIGHT_*)
    admission_waiting: tuple[Backlog, ...] = ()


async def active_snapshot(conn: asyncpg.Connection) -> ActiveSnapshot:
    """One round trip for every figure that changes from second to second."""
    row = await conn.fetchrow(ACTIVE_SNAPSHOT)
    assert row is not None  # an aggregate over FROM (SELECT ...) always yields one row
    active: list[list[Any]] = row["active_jobs"]
    orphans: list[list[Any]] = row["open_orphans"]
    waiting: list[list[Any]] = row["admission_waiting"]
    return ActiveSnapshot(
        active_jobs=tuple(ActiveJobs(k, s, int(n), float(age)) for k, s, n, age in active),
        outbox_due=row["due"],
        outbox_pending=row["pending"],
        outbox_oldest_due_age_seconds=row["oldest_due_age"],
        open_orphans=tuple(Backlog(k, int(n), float(age)) for k, n, age in orphans),
        last_reconcile_success=row["last_reconcile"],
        open_orphan_reasons=tuple((k, r, int(n)) for k, r, n in row["open_orphan_reasons"]),
        admission_waiting=tuple(
            Backlog(k, int(n), float(age)) for k, n, age in waiting
        ),
    )


async def finished_job_counts(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    """Finished jobs by (kind, status): visits every finished row, so run it sparingly."""
    rows = await conn.fetch(FINISHED_JOB_COUNTS)
    return {(r["kind"], r["status"]): r["n"] for r in rows}
