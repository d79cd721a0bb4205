"""Ingest one verified webhook delivery: applied to its job, a duplicate, stale, or orphaned.

A delivery for a job we know costs one statement (`store.webhooks.INGEST`), which decides
under the job's lock with the event's plan; what it did is checked against the state
machine here. An id that is neither a job nor a known alias takes the backend id's lock,
looks again, and only then claims the key and records the orphan (or, when an alias was
committed meanwhile, applies to its job). See `gateway.store.webhooks` for the locking.
"""

from __future__ import annotations

import dataclasses
import enum

import asyncpg
import msgspec

from gateway.jobs.prompts import normalize
from gateway.jobs.records import LockedJob
from gateway.store import jobs as store_jobs
from gateway.store import orphans
from gateway.store import webhooks as store_webhooks
from gateway.store.errors import StoreError
from gateway.store.jobs import Applied
from gateway.store.webhooks import Delivery


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    ORPHANED = "orphaned"


@dataclasses.dataclass(frozen=True, slots=True)
class Ingested:
    """What one delivery did. `job` is the job as locked, before `applied` changed it."""

    outcome: Outcome
    job: LockedJob | None = None
    applied: Applied | None = None
    orphan_event_id: int | None = None


async def ingest(conn: asyncpg.Connection, delivery: Delivery) -> Ingested:
    """Dedupe and apply one delivery. Outside a transaction, each statement commits on its
    own; inside the caller's, everything commits with it."""
    statement, args, plan = store_webhooks.ingest_statement(delivery)
    row = await conn.fetchrow(statement, *args)
    if row is not None:
        job = store_jobs.locked_job(row)
        if row["seen"] or (row["locked"] and not row["claimed"]):
            return Ingested(Outcome.DUPLICATE, job)
        if row["locked"]:
            step = plan.apply(job.state)
            if step.applied != row["applies"]:
                raise StoreError(f"the database and the state machine disagree on job {job.id}")
            if step.applied:
                return Ingested(
                    Outcome.APPLIED, job, Applied(step, row["seq"], row["notification_id"])
                )
            return Ingested(Outcome.STALE, job, Applied(step, job.seq))
        # the job was read but was gone when the statement came to lock it
    async with conn.transaction():
        return await _ingest_locked(conn, delivery, store_webhooks.event_status(delivery.payload))


async def _ingest_locked(conn: asyncpg.Connection, delivery: Delivery, status: str) -> Ingested:
    kind, payload = delivery.kind, delivery.payload
    await orphans.lock_backend_id(conn, kind, payload.job_id)
    job = await store_jobs.lock_for_backend_id(conn, kind, payload.job_id)
    if job is not None:
        # an alias was committed since the first look
        if not await store_webhooks.claim(conn, delivery, status, job.id, Outcome.APPLIED):
            return Ingested(Outcome.DUPLICATE, job)
        return await _apply(conn, job, delivery)

    if not await store_webhooks.claim(conn, delivery, status, None, Outcome.ORPHANED):
        return Ingested(Outcome.DUPLICATE)
    prompt = payload.hinted_prompt(kind)
    event_id = await orphans.record(
        conn,
        kind,
        payload.job_id,
        dedupe_key=delivery.dedupe_key,
        event_status=status,
        # the body as sent, unknown fields included (the jsonb codec passes Raw through)
        payload=msgspec.Raw(delivery.body),
        hints=orphans.OrphanHints(
            user_id=payload.hinted_user_id,
            prompt=prompt,
            prompt_norm=(normalize(prompt) or None) if prompt else None,
            file_count=len(payload.files(kind)),
        ),
    )
    return Ingested(Outcome.ORPHANED, orphan_event_id=event_id)


async def _apply(conn: asyncpg.Connection, job: LockedJob, delivery: Delivery) -> Ingested:
    applied = await store_jobs.apply(conn, job, delivery.payload.to_update(delivery.kind))
    if not applied.transition.applied:
        await store_webhooks.mark_stale(conn, delivery.dedupe_key)
        return Ingested(Outcome.STALE, job, applied)
    return Ingested(Outcome.APPLIED, job, applied)
