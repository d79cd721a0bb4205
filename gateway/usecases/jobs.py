"""Create a job and cancel one: the client API's two changes.

A job is committed together with its outbox row in one statement, so an accepted job is
never lost and is delivered to the generator in the background. A cancel goes through the
state machine like every change and is passed on to the backend through the outbox.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.errors import GatewayError, TooManyRequests
from gateway.jobs import limits as job_limits
from gateway.jobs.kinds import Kind
from gateway.jobs.limits import Limits
from gateway.jobs.records import JobUpdate, LockedJob
from gateway.jobs.state import Event, Status
from gateway.store import Database, outbox, owned_jobs
from gateway.store import jobs as store_jobs
from gateway.store import limits as store_limits
from gateway.store.jobs import Applied
from gateway.store.owned_jobs import Created, JobView, NewJob

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


async def create(
    db: Database,
    new: NewJob,
    payload: dict[str, Any],
    defaults: Limits,
    *,
    wait_for_admission: bool = False,
) -> Admitted:
    """The job `new` with its delivery of `payload` to the backend, committed together; or
    the job an earlier request with the same idempotency key made. KeyReused when that
    request was a different one; LimitReached, with nothing written, when the user is at a
    limit (`defaults` unless an operator overrode them for the user). With
    `wait_for_admission` the delivery waits until a dispatcher admits it."""
    off = Limits(0, 0)
    headers: dict[str, str] = {}
    if defaults == off:
        # both off unless the user has an override: then no lock, no counts, one statement
        async with db.connection() as conn:
            made = await owned_jobs.insert(conn, new, "generate", payload,
                                           wait_for_admission=wait_for_admission,
                                           unless_overridden=True)
        if made is not None:
            return Admitted(made, headers)
        # an override, or the key used before: decided below
    async with db.transaction() as conn:
        limits = defaults
        if defaults == off:
            override = await store_limits.read_override(conn, new.user_id)
            limits = override.applied(new.kind, defaults) if override else defaults
        if limits != off:
            # the user's creates of this kind queue here, on every replica, until each commits
            override = await store_limits.lock_and_read_override(conn, new.user_id, new.kind)
            limits = override.applied(new.kind, defaults) if override else defaults
            usage, now = await store_limits.usage(conn, new.user_id, new.kind, limits.per_hour)
            headers = job_limits.headers(new.kind, limits, usage, now)
            if new.idempotency_key is not None:
                earlier = await owned_jobs.find_by_idempotency_key(conn, new)
                if earlier is not None:
                    if not earlier.same_request:
                        raise KeyReused()
                    return Admitted(earlier, headers)
            refusal = job_limits.check(new.kind, limits, usage, now)
            if refusal is not None:
                raise LimitReached(
                    f"{refusal.limit} is {refusal.value}",
                    retry_after=refusal.retry_after,
                    limit=refusal.limit,
                    value=refusal.value,
                    extra_headers=headers,
                )
        created = await owned_jobs.create(
            conn, new, "generate", payload, wait_for_admission=wait_for_admission
        )
        if headers:
            after = dataclasses.replace(
                usage, active=usage.active + 1, in_window=usage.in_window + 1,
                oldest_leaves_at=usage.oldest_leaves_at or created.created_at + job_limits.WINDOW,
            )
            headers = job_limits.headers(new.kind, limits, after, now)
    if not created.same_request:
        raise KeyReused()
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
