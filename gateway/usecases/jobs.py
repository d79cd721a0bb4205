"""Create a job and cancel one: the client API's two changes.

A job is committed together with its outbox row in one statement, so an accepted job is
never lost and is delivered to the generator in the background. A cancel goes through the
state machine like every change and is passed on to the backend through the outbox.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from gateway.errors import GatewayError, TooManyRequests
from gateway.jobs import limits as job_limits
from gateway.jobs.kinds import Kind
from gateway.jobs.limits import Limits
from gateway.jobs.records import JobUpdate, LockedJob
from gateway.jobs.state import Event, Status
from gateway.store import Database, outbox, owned_jobs
from gateway.store import jobs as store_jobs
from gateway.store.jobs import Applied
from gateway.store.owned_jobs import Created, CreateRequest, Creation, JobView, NewJob

CANCELLED_MESSAGE = "Cancelled by the user."


class KeyReused(GatewayError):
    """The idempotency key was already used with a different request."""


class LimitReached(TooManyRequests):
    """A limit on creating jobs is reached."""


@dataclasses.dataclass(frozen=True, slots=True)
class Admitted:
    created: Created
    # the RateLimit-Policy / RateLimit fields of the answer
    headers: dict[str, str]


async def create_alone(db: Database, request: CreateRequest) -> Creation:
    """One create in its own transaction (one call)."""
    async with db.connection() as conn:
        return await owned_jobs.create(conn, request)


async def create_many(
    conn: asyncpg.Connection, requests: Sequence[CreateRequest]
) -> list[Creation | None]:
    """Creates in one transaction (one round trip), each as `create_alone` makes it: a key
    repeated among them finds the job the first made. They run grouped by user and kind (in
    arrival order within), so that the batches of several processes take the per-user
    locks in one order."""
    order = sorted(range(len(requests)),
                   key=lambda i: (requests[i].new.user_id, requests[i].new.kind.value))
    made = await owned_jobs.create_many(conn, [requests[i] for i in order])
    outcomes: list[Creation | None] = [None] * len(requests)
    for i, creation in zip(order, made, strict=True):
        outcomes[i] = creation
    return outcomes


async def create(
    db: Database,
    new: NewJob,
    payload: dict[str, Any],
    defaults: Limits,
    *,
    wait_for_admission: bool = False,
    batched: Callable[[CreateRequest], Awaitable[Creation]] | None = None,
) -> Admitted:
    """The job `new` with its delivery of `payload` to the backend, committed together; or
    the job an earlier request with the same idempotency key made. KeyReused when that
    request was a different one; LimitReached, with nothing written, when the user is at a
    limit (`defaults` unless an operator overrode them for the user). With
    `wait_for_admission` the delivery waits until a dispatcher admits it. `batched` (a
    group-commit stage's submit) commits it with the creates gathered meanwhile."""
    request = CreateRequest(new, payload, defaults, wait_for_admission)
    if batched is not None:
        creation = await batched(request)
    else:
        creation = await create_alone(db, request)
    created, limits, usage, now = (
        creation.created, creation.limits, creation.usage, creation.read_at
    )
    headers: dict[str, str] = {}
    if created is None:
        # the store refused by the rule job_limits.check states: it says why, and when to retry
        assert usage is not None
        assert now is not None
        refusal = job_limits.check(new.kind, limits, usage, now)
        assert refusal is not None, "refused within the limits"
        raise LimitReached(
            f"{refusal.limit} is {refusal.value}",
            retry_after=refusal.retry_after,
            limit=refusal.limit,
            value=refusal.value,
            extra_headers=job_limits.headers(new.kind, limits, usage, now),
        )
    if not created.same_request:
        raise KeyReused()
    if usage is not None and now is not None:
        if created.inserted:
            usage = dataclasses.replace(
                usage, active=usage.active + 1, in_window=usage.in_window + 1,
                oldest_leaves_at=usage.oldest_leaves_at or created.created_at + job_limits.WINDOW,
            )
        headers = job_limits.headers(new.kind, limits, usage, now)
    return Admitted(created, headers)


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
