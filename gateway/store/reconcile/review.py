"""What needs a person: this run's doubts and every orphan left unmatched; the last runs' state."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import asyncpg

# what needs review: this run's doubts and every orphan left unmatched

REVIEW = """
WITH flagged AS (
    SELECT p.kind, p.backend_job_id, p.outcome, p.rule, p.evidence
    FROM reconcile_plan p
    WHERE p.run_id = $1 AND p.outcome IN ('ambiguous', 'no_candidate', 'expired')
    UNION ALL
    SELECT o.kind, o.backend_job_id, last.outcome, last.rule, last.evidence
    FROM orphans o
    LEFT JOIN LATERAL (
        SELECT d.outcome, d.rule, d.evidence FROM reconcile_decisions d
        WHERE d.kind = o.kind AND d.backend_job_id = o.backend_job_id
        ORDER BY d.id DESC LIMIT 1
    ) AS last ON true
    WHERE o.state = 'unmatched'
      AND NOT EXISTS (SELECT 1 FROM reconcile_plan p
                      WHERE p.run_id = $1 AND p.kind = o.kind
                        AND p.backend_job_id = o.backend_job_id)
)
SELECT f.kind, f.backend_job_id, o.state, f.outcome, f.rule, f.evidence, o.user_id, o.prompt,
       o.first_seen_at, o.file_count, o.event_count, count(*) OVER () AS total
FROM flagged f
JOIN orphans o ON o.kind = f.kind AND o.backend_job_id = f.backend_job_id
ORDER BY o.first_seen_at, f.kind, f.backend_job_id
LIMIT $2
"""


@dataclasses.dataclass(frozen=True, slots=True)
class ReviewItem:
    kind: str
    backend_job_id: str
    state: str
    outcome: str | None
    rule: str | None
    reason: str | None
    user_id: str | None
    prompt: str | None
    first_seen_at: dt.datetime
    file_count: int
    event_count: int
    evidence: dict[str, Any]


async def review(
    conn: asyncpg.Connection, run_id: int, *, limit: int
) -> tuple[int, list[ReviewItem]]:
    """(how many orphans need review, the first `limit` of them, oldest first)."""
    rows = await conn.fetch(REVIEW, run_id, limit)
    total = rows[0]["total"] if rows else 0
    return total, [
        ReviewItem(
            kind=r["kind"], backend_job_id=r["backend_job_id"], state=r["state"],
            outcome=r["outcome"], rule=r["rule"],
            reason=(r["evidence"] or {}).get("reason"),
            user_id=r["user_id"], prompt=r["prompt"], first_seen_at=r["first_seen_at"],
            file_count=r["file_count"], event_count=r["event_count"],
            evidence=r["evidence"] or {},
        )
        for r in rows
    ]


STATUS = """
SELECT (SELECT max(finished_at) FROM reconcile_runs
        WHERE state = 'succeeded' AND NOT dry_run) AS last_success_at,
       (SELECT count(*) FROM orphans WHERE state = 'unresolved') AS unresolved,
       (SELECT count(*) FROM orphans WHERE state = 'unmatched') AS unmatched
"""


@dataclasses.dataclass(frozen=True, slots=True)
class ReconcileStatus:
    last_success_at: dt.datetime | None
    open_orphans: dict[str, int]


async def status(conn: asyncpg.Connection) -> ReconcileStatus:
    """When a real run last succeeded, and how many orphans are open, by state."""
    row = await conn.fetchrow(STATUS)
    return ReconcileStatus(row["last_success_at"],
                   {"unresolved": row["unresolved"], "unmatched": row["unmatched"]})
