"""A job's change history (job_events); `store.listen` hears new changes.

`store.jobs.apply` writes every visible change as a `job_events` row and sends
`pg_notify('sorami_job_events', '<job_id>:<seq>')` in the same transaction. A notification
only says "look again": readers always take the changes themselves from `job_events`, so a
notification lost while a listener reconnects costs nothing but a re-read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import asyncpg

from gateway.jobs.state import Status
from gateway.store.statuses import literal

LISTENER_APPLICATION_NAME = "sorami-job-events"


@dataclasses.dataclass(frozen=True, slots=True)
class JobEventRow:
    seq: int
    status: Status
    progress: int
    message: str | None
    error_message: str | None
    created_at: dt.datetime


# The failure's error text lives on the job (a FAILED event is final, so it is the same).
EVENTS_AFTER = f"""
SELECT e.seq, e.status, e.progress, e.message, e.created_at,
       CASE WHEN e.status = {literal(Status.FAILED)} THEN j.error_message END AS error_message
FROM job_events e JOIN jobs j ON j.id = e.job_id
WHERE e.job_id = $1 AND e.seq > $2
ORDER BY e.seq
"""


async def events_after(conn: asyncpg.Connection, job_id: str, seq: int) -> list[JobEventRow]:
    """Every change of a job after `seq`, in order."""
    rows = await conn.fetch(EVENTS_AFTER, job_id, seq)
    return [
        JobEventRow(
            seq=r["seq"],
            status=Status(r["status"]),
            progress=r["progress"],
            message=r["message"],
            error_message=r["error_message"],
            created_at=r["created_at"],
        )
        for r in rows
    ]
