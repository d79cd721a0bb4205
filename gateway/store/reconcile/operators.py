"""The store's side of what operators do by hand: list orphans, lock one, dismiss it,
record a decision."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.matching import LockedOrphan
from gateway.store import orphans

# operators: listing, assigning, dismissing

LIST_ORPHANS = """
SELECT o.kind, o.backend_job_id, o.state, o.user_id, o.prompt, o.file_count, o.event_count,
       o.first_seen_at, o.last_seen_at, o.job_id, o.resolved_at,
       last.outcome AS last_outcome, last.rule AS last_rule, last.evidence AS last_evidence,
       last.actor AS last_actor, last.reason AS last_reason, last.created_at AS decided_at
FROM orphans o
LEFT JOIN LATERAL (
    SELECT d.outcome, d.rule, d.evidence, d.actor, d.reason, d.created_at
    FROM reconcile_decisions d
    WHERE d.kind = o.kind AND d.backend_job_id = o.backend_job_id
    ORDER BY d.id DESC LIMIT 1
) AS last ON true
WHERE o.state = ANY($1::text[])
ORDER BY o.first_seen_at, o.kind, o.backend_job_id
"""

ORPHAN_KINDS = """
SELECT kind FROM orphans WHERE backend_job_id = $1 ORDER BY kind
"""

ORPHAN_FOR_UPDATE = """
SELECT kind, backend_job_id, state, user_id, job_id FROM orphans
WHERE kind = $1 AND backend_job_id = $2
FOR UPDATE
"""

DISMISS_ORPHAN = """
UPDATE orphans SET state = 'dismissed', resolved_at = now()
WHERE kind = $1 AND backend_job_id = $2
"""

INSERT_DECISION = """
INSERT INTO reconcile_decisions (run_id, kind, backend_job_id, job_id, rule, outcome,
                                 evidence, actor, reason)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id
"""


async def list_orphans(
    conn: asyncpg.Connection, states: tuple[str, ...], *, prefetch: int = 500
) -> AsyncIterator[asyncpg.Record]:
    """Orphans in `states` with their latest decision, oldest first, streamed by a cursor.

    Call it inside a transaction (server-side cursors live in one).
    """
    async for row in conn.cursor(LIST_ORPHANS, list(states), prefetch=prefetch):
        yield row


async def orphan_kinds(conn: asyncpg.Connection, backend_job_id: str) -> list[Kind]:
    return [Kind(r["kind"]) for r in await conn.fetch(ORPHAN_KINDS, backend_job_id)]


async def lock_orphan(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str
) -> LockedOrphan | None:
    """The orphan's row, locked, after the backend id's lock (the order attach uses)."""
    await orphans.lock_backend_id(conn, kind, backend_job_id)
    row = await conn.fetchrow(ORPHAN_FOR_UPDATE, kind.value, backend_job_id)
    if row is None:
        return None
    return LockedOrphan(kind, backend_job_id, row["state"], row["job_id"], row["user_id"])


async def dismiss(conn: asyncpg.Connection, kind: Kind, backend_job_id: str) -> None:
    await conn.execute(DISMISS_ORPHAN, kind.value, backend_job_id)


async def record_decision(
    conn: asyncpg.Connection,
    *,
    kind: Kind,
    backend_job_id: str,
    job_id: str | None,
    rule: str,
    outcome: str,
    evidence: dict[str, Any],
    actor: str,
    reason: str | None,
    run_id: int | None = None,
) -> int:
    decision_id: int = await conn.fetchval(
        INSERT_DECISION, run_id, kind.value, backend_job_id, job_id, rule, outcome, evidence,
        actor, reason,
    )
    return decision_id
