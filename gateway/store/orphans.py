"""Orphans: verified webhooks whose job id is neither our job nor a known alias.

`record` keeps every such event whole, grouped per (kind, backend job id), with the hints
the reconciler matches on. `attach` is the one way an orphan reaches its job, used by
delivery (the backend answered its own id), the reconciler and operators: it records the
alias and replays the orphan's events through the state machine in received order, in the
caller's transaction, so a crash leaves the orphan either fully applied or untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode_stored
from gateway.jobs.state import Transition
from gateway.store import jobs as store_jobs
from gateway.store.errors import Duplicate
from gateway.store.jobs import LockedJob

RECORD_ORPHAN = """
WITH orphan AS (
    INSERT INTO orphans AS o (kind, backend_job_id, user_id, prompt, prompt_norm,
                              file_count, event_count)
    VALUES ($1, $2, $3, $4, $5, $6, 1)
    ON CONFLICT (kind, backend_job_id) DO UPDATE SET
        user_id = COALESCE(o.user_id, EXCLUDED.user_id),
        prompt = COALESCE(o.prompt, EXCLUDED.prompt),
        prompt_norm = COALESCE(o.prompt_norm, EXCLUDED.prompt_norm),
        file_count = GREATEST(o.file_count, EXCLUDED.file_count),
        event_count = o.event_count + 1,
        last_seen_at = now()
    RETURNING kind, backend_job_id
)
INSERT INTO orphan_events (kind, backend_job_id, dedupe_key, event_status, payload)
SELECT kind, backend_job_id, $7, $8, $9 FROM orphan
RETURNING id
"""

# Serializes "record an orphan" with "attach this backend id" for one (kind, backend id):
# whoever comes second sees what the first committed.
LOCK_BACKEND_ID = """
SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))
"""

INSERT_ALIAS = """
INSERT INTO job_aliases (kind, backend_job_id, job_id, source)
VALUES ($1, $2, $3, $4)
ON CONFLICT (kind, backend_job_id) DO NOTHING
RETURNING job_id
"""

ALIAS_TARGET = """
SELECT job_id FROM job_aliases WHERE kind = $1 AND backend_job_id = $2
"""

PENDING_EVENTS = """
SELECT id, dedupe_key, payload FROM orphan_events
WHERE kind = $1 AND backend_job_id = $2 AND applied_at IS NULL
ORDER BY received_at, id
FOR UPDATE
"""

MARK_EVENTS_APPLIED = """
UPDATE orphan_events SET applied_at = now() WHERE id = ANY($1::bigint[])
"""

LINK_DELIVERIES = """
UPDATE webhook_deliveries SET job_id = $1 WHERE dedupe_key = ANY($2::text[])
"""

RESOLVE_ORPHAN = """
UPDATE orphans SET state = $3, job_id = $4, resolved_at = now()
WHERE kind = $1 AND backend_job_id = $2
"""

_STATE_FOR_SOURCE = {"delivery": "matched", "reconciler": "matched", "operator": "assigned"}


@dataclasses.dataclass(frozen=True, slots=True)
class OrphanHints:
    user_id: str | None
    prompt: str | None
    prompt_norm: str | None
    file_count: int


@dataclasses.dataclass(frozen=True, slots=True)
class Attached:
    job: LockedJob
    transitions: tuple[Transition, ...]
    notification_ids: tuple[int, ...]


async def lock_backend_id(conn: asyncpg.Connection, kind: Kind, backend_job_id: str) -> None:
    """Take the transaction-scoped lock that `attach` holds for this backend id.

    The receiver's protocol for an id that `jobs.lock_for_backend_id` did not find: take
    this lock, look the id up again (an alias may have just been committed), and only then
    `record` it as an orphan. Without it, an event recorded while `attach` runs would stay
    orphaned although its alias exists.
    """
    await conn.execute(LOCK_BACKEND_ID, kind.value, backend_job_id)


async def record(
    conn: asyncpg.Connection,
    kind: Kind,
    backend_job_id: str,
    *,
    dedupe_key: str,
    event_status: str,
    payload: Any,
    hints: OrphanHints,
) -> int:
    """Keep one verified event for an unknown job id; returns the event's id.

    Call it holding `lock_backend_id` for the same id, after looking the id up again.
    """
    event_id: int = await conn.fetchval(
        RECORD_ORPHAN,
        kind.value,
        backend_job_id,
        hints.user_id,
        hints.prompt,
        hints.prompt_norm,
        hints.file_count,
        dedupe_key,
        event_status,
        payload,
    )
    return event_id


async def attach(
    conn: asyncpg.Connection,
    kind: Kind,
    backend_job_id: str,
    job: LockedJob,
    *,
    source: str,
) -> Attached:
    """Make `backend_job_id` an alias of the locked `job` and replay its orphaned events.

    Raises Duplicate when that backend id already points to another job, or the job already
    has another alias. Attaching the same pair again replays nothing new.
    """
    await lock_backend_id(conn, kind, backend_job_id)
    inserted = await conn.fetchval(INSERT_ALIAS, kind.value, backend_job_id, job.id, source)
    if inserted is None:
        existing = await conn.fetchval(ALIAS_TARGET, kind.value, backend_job_id)
        if existing != job.id:
            raise Duplicate(f"backend job id already belongs to job {existing}")
    events = await conn.fetch(PENDING_EVENTS, kind.value, backend_job_id)
    transitions: list[Transition] = []
    notifications: list[int] = []
    for event in events:
        update = decode_stored(event["payload"]).to_update(kind, source=source)
        applied = await store_jobs.apply(conn, job, update)
        transitions.append(applied.transition)
        if applied.notification_id is not None:
            notifications.append(applied.notification_id)
        job = dataclasses.replace(job, state=applied.transition.state, seq=applied.seq)
    if events:
        await conn.execute(MARK_EVENTS_APPLIED, [e["id"] for e in events])
        await conn.execute(LINK_DELIVERIES, job.id, [e["dedupe_key"] for e in events])
        await conn.execute(
            RESOLVE_ORPHAN, kind.value, backend_job_id, _STATE_FOR_SOURCE[source], job.id
        )
    return Attached(job, tuple(transitions), tuple(notifications))
