"""What a delivery's outcome does: the outbox row settled or given back, and its job moved.

The dispatcher makes the calls and translates the backend's answers; these record them. An
accepted generate makes its job QUEUED and attaches the backend's own id when it differs
(replaying any webhooks that came under it first); a refused or exhausted one fails its job;
a transient failure gives the row back for later; a generate whose job ended first is
settled without a call.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from gateway.jobs.records import JobUpdate, LockedJob
from gateway.jobs.state import Event, Status
from gateway.store import Database, outbox
from gateway.store import jobs as store_jobs
from gateway.store.outbox import Claimed

# what an accepted generate does to its job
ACCEPTED: Final = JobUpdate(
    event=Event(Status.QUEUED), source="delivery", message="Accepted by the generator backend"
)
NOT_TAKEN: Final = "The generator backend did not take the job"
NEVER_RECEIVED: Final = "not sent: the generator backend never received the job"


@dataclasses.dataclass(frozen=True, slots=True)
class Finished:
    """A job that reached a terminal status through a delivery's outcome."""

    job: LockedJob
    status: Status
    notified: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    # False: the row was settled already (nothing written)
    recorded: bool
    # the backend's own id: None (none, or ours), "recorded", or "conflict" (another job's)
    alias: str | None = None
    finished: tuple[Finished, ...] = ()


async def accepted(db: Database, row: Claimed, backend_id: str | None) -> Delivered:
    """One transaction: the row settled, the job QUEUED, the backend's id attached."""
    if row.action == "generate" and backend_id is None:
        # the common case, in one statement when the job did not move since the claim
        async with db.connection() as conn:
            done = await outbox.delivered_and_apply(conn, row, ACCEPTED)
        if done is not None:
            return Delivered(done is not False)
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, row.job_id) if row.action == "generate" else None
        if not await outbox.mark_delivered(conn, row.id):
            return Delivered(False)
        if job is None:
            return Delivered(True)
        applied = await store_jobs.apply(conn, job, ACCEPTED)
        job = dataclasses.replace(job, state=applied.transition.state, seq=applied.seq)
        if backend_id is None:
            return Delivered(True)
        attached = await outbox.record_backend_id(conn, row.kind, backend_id, job)
        if attached is None:
            return Delivered(True, "conflict")
    finished = []
    notified = len(attached.notification_ids)
    for step in attached.transitions:
        if step.finished:
            finished.append(Finished(job, step.state.status, notified > 0))
            notified -= step.state.status is not Status.CANCELLED
    return Delivered(True, "recorded", tuple(finished))


async def failed(
    db: Database, row: Claimed, *, owner: str, error: str
) -> tuple[bool, Finished | None]:
    """Settle the row for good and fail its job (a generate's); False when this claim no
    longer holds the row (nothing written), and the job when it ended here."""
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, row.job_id) if row.action == "generate" else None
        if not await outbox.mark_failed(conn, row, owner=owner, error=error):
            return False, None
        if job is None:
            return True, None
        applied = await store_jobs.apply(
            conn,
            job,
            JobUpdate(event=Event(Status.FAILED), source="delivery", message=NOT_TAKEN,
                      error_message=error),
        )
    if not applied.transition.finished:
        return True, None
    return True, Finished(job, Status.FAILED, applied.notification_id is not None)


async def retried(
    db: Database, row: Claimed, *, owner: str, delay_seconds: float, error: str
) -> bool:
    """Give the row back, due again in `delay_seconds`; False when this claim lost it."""
    async with db.connection() as conn:
        return await outbox.reschedule(
            conn, row, owner=owner, delay_seconds=delay_seconds, error=error
        )


def unsent_reason(row: Claimed) -> str:
    return f"not sent: the job was already {row.job_status.value} before delivery"


async def skipped(db: Database, row: Claimed, *, owner: str) -> bool:
    """A generate row whose job ended before delivery: settled without a call (and, for a
    job cancelled before any call, its cancel too). False when this claim lost the row."""
    async with db.transaction() as conn:
        if not await outbox.mark_failed(conn, row, owner=owner, error=unsent_reason(row)):
            return False
        if row.attempts == 1 and row.job_status is Status.CANCELLED:
            # no earlier claim can have sent it: the backend has nothing to cancel
            await outbox.settle_unsent_cancel(conn, row.job_id, NEVER_RECEIVED)
        return True
