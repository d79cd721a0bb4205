"""Create a job and cancel one: the client API's two changes.

A job is committed together with its outbox row in one statement, so an accepted job is
never lost and is delivered to the generator in the background. A cancel goes through the
state machine like every change and is passed on to the backend through the outbox.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.errors import GatewayError
from gateway.jobs.kinds import Kind
from gateway.jobs.records import JobUpdate, LockedJob
from gateway.jobs.state import Event, Status
from gateway.store import Database, outbox, owned_jobs
from gateway.store import jobs as store_jobs
from gateway.store.jobs import Applied
from gateway.store.owned_jobs import Created, JobView, NewJob

CANCELLED_MESSAGE = "Cancelled by the user."


class KeyReused(GatewayError):
    """The idempotency key was already used with a different request."""


async def create(db: Database, new: NewJob, payload: dict[str, Any]) -> Created:
    """The job `new` with its delivery of `payload` to the backend, committed together; or
    the job an earlier request with the same idempotency key made. KeyReused when that
    request was a different one."""
    async with db.connection() as conn:
        created = await owned_jobs.create(conn, new, "generate", payload)
    if not created.same_request:
        raise KeyReused()
    return created


@dataclasses.dataclass(frozen=True, slots=True)
class Cancelled:
    job: LockedJob  # as locked, before the cancel
    applied: Applied
    view: JobView  # as its owner sees it now


@dataclasses.dataclass(frozen=True, slots=True)
class NotCancelled:
    # None: no such job of this user and kind
    status: Status | None


async def cancel(db: Database, job_id: str, user_id: str, kind: Kind) -> Cancelled | NotCancelled:
    """Cancel the user's job of `kind` unless it is terminal already, and queue the cancel
    for the backend; one transaction."""
    async with db.transaction() as conn:
        job = await owned_jobs.lock_owned(conn, job_id, user_id, kind)
        if job is None:
            return NotCancelled(None)
        if job.state.status.terminal:
            return NotCancelled(job.state.status)
        applied = await store_jobs.apply(
            conn,
            job,
            JobUpdate(Event(Status.CANCELLED), source="cancel", message=CANCELLED_MESSAGE),
        )
        # best effort at the backend, delivered from the outbox like the job itself
        await outbox.enqueue(conn, job.id, "cancel", {"job_id": job.id, "user_id": job.user_id})
        view = await owned_jobs.get_owned(conn, job.id, user_id, kind)
    assert applied.transition.applied
    assert view is not None
    return Cancelled(job, applied, view)
