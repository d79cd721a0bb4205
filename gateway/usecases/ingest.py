"""Ingest one verified webhook delivery: applied to its job, a duplicate, stale, or orphaned.

A delivery for a job we know costs one statement (`store.webhooks.INGEST`), which decides
under the job's lock with the event's plan; what it did is checked against the state
machine here. An id that is neither a job nor a known alias takes the backend id's lock,
looks again, and only then claims the key and records the orphan (or, when an alias was
committed meanwhile, applies to its job). See `gateway.store.webhooks` for the locking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from gateway.jobs.prompts import normalize
from gateway.jobs.records import LockedJob
from gateway.jobs.state import Plan
from gateway.store import Database, orphans
from gateway.store import jobs as store_jobs
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
    known = await _ingest_known(conn, delivery)
    if known is not None:
        return known
    async with conn.transaction():
        return await _ingest_locked(conn, delivery, store_webhooks.event_status(delivery.payload))


async def ingest_alone(db: Database, delivery: Delivery) -> Ingested:
    """One delivery on a connection of its own."""
    async with db.connection() as conn:
        return await ingest(conn, delivery)


async def ingest_many(
    conn: asyncpg.Connection, deliveries: Sequence[Delivery]
) -> list[Ingested | None]:
    """Deliveries for jobs we know, in one transaction; None for the others (an id we do
    not know takes the orphan protocol's lock: `ingest` it on its own).

    Each delivery is the statement `ingest` sends, the jobs taken in the order of the
    webhooks' ids, so that the batches of several processes lock rows in one order. When
    each job has one delivery in the batch, the statements go pipelined, one round trip for
    each of the two statements (progress, then terminal events); when a job has several,
    they go one after another in arrival order (a repeated key is then a duplicate, as
    across transactions)."""
    outcomes: list[Ingested | None] = [None] * len(deliveries)
    order = sorted(range(len(deliveries)), key=lambda i: deliveries[i].payload.job_id)
    if len({d.payload.job_id for d in deliveries}) < len(deliveries):
        async with conn.transaction():
            for i in order:
                outcomes[i] = await _ingest_known(conn, deliveries[i])
        return outcomes
    calls: dict[str, list[tuple[int, tuple[Any, ...], Plan]]] = {}
    for i in order:
        statement, args, plan = store_webhooks.ingest_statement(deliveries[i])
        calls.setdefault(statement, []).append((i, args, plan))
    # one statement: fetchmany's own transaction; both: one around them
    async with contextlib.AsyncExitStack() as stack:
        if len(calls) > 1:
            await stack.enter_async_context(conn.transaction())
        for statement, group in calls.items():
            rows = iter(await conn.fetchmany(statement, [args for _, args, _ in group]))
            row = next(rows, None)
            for i, _, plan in group:
                # no row for an id that names no job
                delivery = deliveries[i]
                if (row is not None and row["delivery_key"] == delivery.dedupe_key
                        and row["delivery_for"] == delivery.payload.job_id):
                    outcomes[i] = _outcome(row, plan)
                    row = next(rows, None)
            if row is not None:
                raise StoreError("a pipelined delivery's row answers none of the deliveries")
    return outcomes


async def _ingest_known(conn: asyncpg.Connection, delivery: Delivery) -> Ingested | None:
    """The delivery applied, stale or a duplicate, when its id names a job; else None,
    nothing written."""
    statement, args, plan = store_webhooks.ingest_statement(delivery)
    row = await conn.fetchrow(statement, *args)
    return None if row is None else _outcome(row, plan)


def _outcome(row: asyncpg.Record, plan: Plan) -> Ingested | None:
    """What INGEST's row for a delivery says it did; None when the job was gone by the time
    the statement came to lock it (nothing written)."""
    job = store_jobs.locked_job(row)
    if row["seen"] or (row["locked"] and not row["claimed"]):
        return Ingested(Outcome.DUPLICATE, job)
    if not row["locked"]:
        return None
    step = plan.apply(job.state)
    if step.applied != row["applies"]:
        raise StoreError(f"the database and the state machine disagree on job {job.id}")
    if step.applied:
        return Ingested(Outcome.APPLIED, job, Applied(step, row["seq"], row["notification_id"]))
    return Ingested(Outcome.STALE, job, Applied(step, job.seq))


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
