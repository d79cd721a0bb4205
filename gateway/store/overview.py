"""The whole picture, read for a check after a run (the demo's invariants): every job with
how it was resolved, the orphans still open with their latest decision, every file with its
job's owner, every notification. Whole tables: for small databases only."""

from __future__ import annotations

import dataclasses

import asyncpg

from gateway.jobs.matching import OPEN_STATES
from gateway.jobs.state import Status

JOBS = """
SELECT j.id, j.user_id, j.status, a.source AS alias_source,
       (SELECT count(*) FROM job_files f WHERE f.job_id = j.id) AS files,
       EXISTS (SELECT 1 FROM webhook_deliveries d
               WHERE d.job_id = j.id AND d.backend_job_id = j.id) AS direct
FROM jobs j LEFT JOIN job_aliases a ON a.job_id = j.id
"""

OPEN_ORPHANS = """
SELECT o.backend_job_id, o.kind, o.user_id, o.prompt, d.outcome, d.rule
FROM orphans o
LEFT JOIN LATERAL (
    SELECT outcome, rule FROM reconcile_decisions r
    WHERE r.kind = o.kind AND r.backend_job_id = o.backend_job_id
    ORDER BY r.id DESC LIMIT 1) d ON true
WHERE o.state = ANY($1::text[])
"""

FILE_OWNERS = """
SELECT f.url, j.user_id FROM job_files f JOIN jobs j ON j.id = f.job_id
"""

NOTIFICATIONS = """
SELECT job_id, type FROM notifications
"""

COUNT_DELIVERIES = """
SELECT count(*) FROM webhook_deliveries
"""


@dataclasses.dataclass(frozen=True, slots=True)
class JobOverview:
    id: str
    user_id: str
    status: Status
    # who recorded the backend's own id for the job: delivery, reconciler, operator; or None
    alias_source: str | None
    files: int
    # the backend reported under our own id
    direct: bool


@dataclasses.dataclass(frozen=True, slots=True)
class OpenOrphan:
    backend_job_id: str
    kind: str
    user_id: str | None
    prompt: str | None
    # the latest decision's, None when no run looked at it yet
    outcome: str | None
    rule: str | None


async def jobs(conn: asyncpg.Connection) -> dict[str, JobOverview]:
    return {
        r["id"]: JobOverview(r["id"], r["user_id"], Status(r["status"]), r["alias_source"],
                             r["files"], r["direct"])
        for r in await conn.fetch(JOBS)
    }


async def open_orphans(conn: asyncpg.Connection) -> list[OpenOrphan]:
    return [
        OpenOrphan(r["backend_job_id"], r["kind"], r["user_id"], r["prompt"], r["outcome"],
                   r["rule"])
        for r in await conn.fetch(OPEN_ORPHANS, list(OPEN_STATES))
    ]


async def file_owners(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """(url, the user who owns the file's job) for every file."""
    return [(r["url"], r["user_id"]) for r in await conn.fetch(FILE_OWNERS)]


async def notification_types(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """The types of each job's notifications."""
    per_job: dict[str, list[str]] = {}
    for r in await conn.fetch(NOTIFICATIONS):
        per_job.setdefault(r["job_id"], []).append(r["type"])
    return per_job


async def count_deliveries(conn: asyncpg.Connection) -> int:
    """Webhook deliveries recorded (their dedupe rows)."""
    count: int = await conn.fetchval(COUNT_DELIVERIES)
    return count
