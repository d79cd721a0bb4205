"""Webhook ingest: one transaction per verified delivery, its dedupe row and its effect together.

The delivery's dedupe key is claimed with `INSERT ... ON CONFLICT DO NOTHING` in the same
transaction as the effect, so a delivery seen before (committed) is a duplicate and changes
nothing, and one rolled back leaves no trace to be mistaken for one.

The hot path (a job we know, an event that moves it) costs two round trips and no explicit
transaction: `PEEK` reads the job and whether the key is taken; the state machine decides
from what was read; then one statement (`claim_and_apply`) locks the job's row only if its
`seq` is still the one read, claims the key, and writes the effect only if the claim
succeeded. One statement is one transaction, so the claim and the effect commit together
or not at all. A key already taken is a duplicate at once (one round trip). Anything else,
a job changed between the two looks, a stale event, an alias or an orphan, takes the
locked path inside a transaction: the job's row lock and the claim in one statement
(`CLAIM_AND_LOCK`), then `jobs.apply`. The claim is written as `applied` and corrected to
`stale` in the same transaction when the state machine says so. Locking the row first
makes deliveries for one job queue behind each other (a repeated delivery then finds the
key committed), while different jobs proceed in parallel.

An id that is neither a job nor a known alias follows the protocol of
`orphans.lock_backend_id`: take the backend id's lock, look again, and only then claim the
key and record the orphan. The key is claimed after the job's row lock or the backend id's
lock, never before, so two transactions never wait for each other in opposite orders.
"""

from __future__ import annotations

import dataclasses
import enum

import asyncpg
import msgspec

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import WebhookPayload
from gateway.jobs.prompts import normalize
from gateway.jobs.state import transition
from gateway.store import jobs as store_jobs
from gateway.store import orphans
from gateway.store.jobs import Applied, LockedJob


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    ORPHANED = "orphaned"


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """A verified, decoded webhook delivery."""

    kind: Kind
    dedupe_key: str
    payload: WebhookPayload
    # the verified body as received, kept whole when the delivery becomes an orphan event
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Ingested:
    """What one delivery did. `job` is the job as locked, before `applied` changed it."""

    outcome: Outcome
    job: LockedJob | None = None
    applied: Applied | None = None
    orphan_event_id: int | None = None


def _claim_for_job(key: str, kind: str, backend_id: str, status: str) -> str:
    """The delivery's claim as an `applied` delivery of the job in the CTE `job` (no job:
    no claim), given the parameters holding each value."""
    return f"""claim AS (
    INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id, event_status,
                                    outcome)
    SELECT {key}, {kind}, {backend_id}, job.id, {status}, 'applied' FROM job
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING dedupe_key
)"""


# The job's row lock (the same resolution as jobs.lock_for_backend_id: our id, else an
# alias), and the delivery's claim, in one statement. No job: no claim; see ingest.
CLAIM_AND_LOCK = f"""
WITH job AS ({store_jobs.LOCK_BY_BACKEND_ID}),
{_claim_for_job("$3", "$2", "$1", "$4")}
SELECT job.*, EXISTS (SELECT 1 FROM claim) AS claimed FROM job
"""

CLAIM = """
INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id, event_status, outcome)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING dedupe_key
"""

MARK_STALE = """
UPDATE webhook_deliveries SET outcome = 'stale' WHERE dedupe_key = $1
"""


# The job the payload names, unlocked, and whether the delivery's key is taken already.
PEEK = f"""
SELECT job.*, EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.dedupe_key = $3) AS seen
FROM ({store_jobs.BY_BACKEND_ID}) AS job
"""


def _claim_then_apply(finished: bool) -> str:
    """`jobs.apply`'s statement behind a lock on the job at the `seq` PEEK read and the
    delivery's claim; it writes only when both hold, and says which did not."""
    first = (store_jobs.APPLY_FINISHED_PARAMETERS if finished
             else store_jobs.APPLY_PARAMETERS) + 1
    seq, key, kind, backend_id, status = (f"${n}" for n in range(first, first + 5))
    ctes = f"""
job AS (
    SELECT id FROM jobs WHERE id = $1 AND seq = {seq} FOR UPDATE
), {_claim_for_job(key, kind, backend_id, status)}, flags AS (
    SELECT EXISTS (SELECT 1 FROM job) AS locked, EXISTS (SELECT 1 FROM claim) AS claimed
)"""
    return store_jobs.guarded(
        finished,
        ctes,
        guard="(SELECT claimed FROM flags)",
        columns="(SELECT locked FROM flags) AS locked, (SELECT claimed FROM flags) AS claimed, ",
    )


CLAIM_AND_APPLY = _claim_then_apply(finished=False)
CLAIM_AND_APPLY_FINISHED = _claim_then_apply(finished=True)


async def ingest(conn: asyncpg.Connection, delivery: Delivery) -> Ingested:
    """Dedupe and apply one delivery. Outside a transaction, each statement commits on its
    own; inside the caller's, everything commits with it."""
    kind, payload = delivery.kind, delivery.payload
    status = event_status(payload)
    row = await conn.fetchrow(PEEK, payload.job_id, kind.value, delivery.dedupe_key)
    if row is not None:
        job = LockedJob.from_record(row)
        if row["seen"]:
            return Ingested(Outcome.DUPLICATE, job)
        update = payload.to_update(kind)
        step = transition(job.state, update.event)
        if step.applied:
            args = store_jobs.apply_arguments(job, update, step)
            done = await conn.fetchrow(
                CLAIM_AND_APPLY_FINISHED if step.finished else CLAIM_AND_APPLY,
                *args, job.seq, delivery.dedupe_key, kind.value, payload.job_id, status,
            )
            assert done is not None
            if done["claimed"]:
                return Ingested(
                    Outcome.APPLIED, job, Applied(step, done["seq"], done["notification_id"])
                )
            if done["locked"]:
                return Ingested(Outcome.DUPLICATE, job)
            # the job changed since PEEK read it: decide again, under its lock
    async with conn.transaction():
        return await _ingest_locked(conn, delivery, status)


async def _ingest_locked(conn: asyncpg.Connection, delivery: Delivery, status: str) -> Ingested:
    kind, payload = delivery.kind, delivery.payload
    row = await conn.fetchrow(
        CLAIM_AND_LOCK, payload.job_id, kind.value, delivery.dedupe_key, status
    )
    if row is not None:
        locked = LockedJob.from_record(row)
        if not row["claimed"]:
            return Ingested(Outcome.DUPLICATE, locked)
        return await _apply(conn, locked, delivery)

    await orphans.lock_backend_id(conn, kind, payload.job_id)
    job = await store_jobs.lock_for_backend_id(conn, kind, payload.job_id)
    if job is not None:
        # an alias was committed between the two looks
        if not await _claim(conn, delivery, status, job.id, Outcome.APPLIED):
            return Ingested(Outcome.DUPLICATE, job)
        return await _apply(conn, job, delivery)

    if not await _claim(conn, delivery, status, None, Outcome.ORPHANED):
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


def event_status(payload: WebhookPayload) -> str:
    """The backend's status word, normalised (`completed`, `failed`, ...)."""
    return payload.job_status.value.lower()


async def _claim(
    conn: asyncpg.Connection,
    delivery: Delivery,
    status: str,
    job_id: str | None,
    outcome: Outcome,
) -> bool:
    claimed = await conn.fetchval(
        CLAIM,
        delivery.dedupe_key,
        delivery.kind.value,
        delivery.payload.job_id,
        job_id,
        status,
        outcome.value,
    )
    return claimed is not None


async def _apply(conn: asyncpg.Connection, job: LockedJob, delivery: Delivery) -> Ingested:
    applied = await store_jobs.apply(conn, job, delivery.payload.to_update(delivery.kind))
    if not applied.transition.applied:
        await conn.execute(MARK_STALE, delivery.dedupe_key)
        return Ingested(Outcome.STALE, job, applied)
    return Ingested(Outcome.APPLIED, job, applied)
