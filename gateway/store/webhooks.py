"""Webhook ingest's statements: one transaction per verified delivery, its dedupe row and its
effect together (`gateway.usecases.ingest` decides with them).

The delivery's dedupe key is claimed with `INSERT ... ON CONFLICT DO NOTHING` in the same
transaction as the effect, so a delivery seen before (committed) is a duplicate and changes
nothing, and one rolled back leaves no trace to be mistaken for one.

A delivery for a job we know costs one round trip and no explicit transaction: one statement
(`INGEST`, or `INGEST_FINISHED` for a terminal event) finds the job, and unless the key is
already taken, locks the job's row, decides under the lock with the event's plan from the
state machine (`gateway.jobs.state.plan`: applied or stale, and the new progress), claims
the key as `applied` or `stale`, and writes the effect only when the claim succeeded and the
event applies. One statement is one transaction, so the claim and the effect commit
together or not at all. The decision is made on the row as locked, not as first read: a
job changed by another transaction while the statement waited for its lock is decided on its
new state. Locking the row first makes deliveries for one job queue behind each other (a
repeated delivery then finds the key committed), while different jobs proceed in parallel.

An id that is neither a job nor a known alias follows the protocol of
`orphans.lock_backend_id` inside a transaction: take the backend id's lock, look again, and
only then claim the key and record the orphan (or, when an alias was committed meanwhile,
apply to its job). The key is claimed after the job's row lock or the backend id's lock,
never before, so two transactions never wait for each other in opposite orders.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import WebhookPayload
from gateway.jobs.state import JobState, Plan, Status
from gateway.jobs.state import plan as state_plan
from gateway.store import jobs as store_jobs
from gateway.store.statements import Statement


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """A verified, decoded webhook delivery."""

    kind: Kind
    dedupe_key: str
    payload: WebhookPayload
    # the verified body as received, kept whole when the delivery becomes an orphan event
    body: bytes


CLAIM = """
INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id, event_status, outcome)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING dedupe_key
"""

MARK_STALE = """
UPDATE webhook_deliveries SET outcome = 'stale' WHERE dedupe_key = $1
"""


def _ingest(finished: bool) -> Statement:
    """`jobs.apply`'s statement for the job a webhook's id names, behind the decision of the
    event's plan on the job's row as locked and the delivery's claim."""
    ctes = f"""
found AS ({store_jobs.by_backend_id("$backend_job_id", "$kind")}), seen AS (
    SELECT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.dedupe_key = $dedupe_key) AS dup
), job AS (
    SELECT {store_jobs.JOB_COLUMNS} FROM jobs j
    WHERE j.id = (SELECT id FROM found) AND NOT (SELECT dup FROM seen)
    FOR UPDATE
), step AS (
    SELECT job.id, job.status::text = ANY($always::text[])
                   OR (job.status::text = ANY($if_advances::text[]) AND job.progress < $progress)
                   AS applies
    FROM job
), claim AS (
    INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id, event_status,
                                    outcome)
    SELECT $dedupe_key, $kind, $backend_job_id, step.id, $event_status,
           CASE WHEN step.applies THEN 'applied' ELSE 'stale' END
    FROM step
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING dedupe_key
), flags AS (
    SELECT EXISTS (SELECT 1 FROM job) AS locked, EXISTS (SELECT 1 FROM claim) AS claimed,
           COALESCE((SELECT applies FROM step), false) AS applies
)"""
    text = store_jobs.guarded(
        finished,
        ctes,
        guard="(SELECT claimed AND applies FROM flags)",
        columns="j.*, (SELECT dup FROM seen) AS seen, (SELECT locked FROM flags) AS locked, "
                "(SELECT claimed FROM flags) AS claimed, (SELECT applies FROM flags) AS applies, "
                # which delivery the row answers, when several are pipelined
                "$dedupe_key AS delivery_key, $backend_job_id AS delivery_for, ",
        target="(SELECT id FROM step)",
        progress="GREATEST($progress, progress)",
        source="FROM (SELECT * FROM job UNION ALL SELECT * FROM found"
               " WHERE NOT EXISTS (SELECT 1 FROM job)) AS j",
    )
    # the webhook's id first, where APPLY has the job's (bench/ingest binds it by position)
    params = ("backend_job_id", *store_jobs.APPLY_PARAMS[1:],
              *(store_jobs.FINISHED_PARAMS if finished else ()),
              "always", "if_advances", "dedupe_key", "kind", "event_status")
    if finished:
        return Statement.compose(
            "INGEST_FINISHED",
            "INGEST of a terminal event: APPLY_FINISHED's files and notification too.",
            text, params,
        )
    return Statement.compose(
        "INGEST",
        "A webhook for a job we know, in one statement: find the job by our id or an alias,\n"
        "lock it unless the delivery's key is taken, decide with the event's plan (always /\n"
        "if_advances) on the row as locked, claim the key as applied or stale, and apply the\n"
        "event only when the claim succeeded and the plan applies. One row when the job\n"
        "exists: the job (as locked, else as read), the flags, the delivery's key and id,\n"
        "the new seq.",
        text, params,
    )


INGEST = _ingest(finished=False)
INGEST_FINISHED = _ingest(finished=True)


@functools.lru_cache(maxsize=64)
def _names(statuses: frozenset[Status]) -> tuple[str, ...]:
    return tuple(sorted(s.value for s in statuses))


def ingest_statement(delivery: Delivery) -> tuple[str, tuple[Any, ...], Plan]:
    """What `ingest` sends first for `delivery`: INGEST, or INGEST_FINISHED for a terminal
    event; its parameters; and the plan of the delivery's event they carry."""
    kind, payload = delivery.kind, delivery.payload
    update = payload.to_update(kind)
    plan = state_plan(update.event)
    values = store_jobs.update_values(
        payload.job_id, kind, update, JobState(plan.status, plan.progress), plan.finishes
    )
    values.update(
        backend_job_id=payload.job_id,
        always=_names(plan.always),
        if_advances=_names(plan.if_advances),
        dedupe_key=delivery.dedupe_key,
        kind=kind.value,
        event_status=event_status(payload),
    )
    statement = INGEST_FINISHED if plan.finishes else INGEST
    return statement.sql, statement.args(values), plan


def event_status(payload: WebhookPayload) -> str:
    """The backend's status word, normalised (`completed`, `failed`, ...)."""
    return payload.job_status.value.lower()


async def claim(
    conn: asyncpg.Connection, delivery: Delivery, status: str, job_id: str | None, outcome: str
) -> bool:
    """Claim the delivery's dedupe key with its outcome; False when it was taken already."""
    claimed = await conn.fetchval(
        CLAIM,
        delivery.dedupe_key,
        delivery.kind.value,
        delivery.payload.job_id,
        job_id,
        status,
        outcome,
    )
    return claimed is not None


async def mark_stale(conn: asyncpg.Connection, dedupe_key: str) -> None:
    """A claimed delivery's event turned out not to apply."""
    await conn.execute(MARK_STALE, dedupe_key)
