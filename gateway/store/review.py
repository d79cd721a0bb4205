"""The review console's reads: open orphans page by page, and one orphan with everything a
person needs to decide it (events, decisions, candidate jobs). Every query reads through an
index: the list walks `orphans_review_age` (migration 0011) in its own order."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.matching import OPEN_STATES

# The reason an orphan waits: its latest decision's outcome, or none yet.
_LATEST = """LEFT JOIN LATERAL (
    SELECT d.outcome, d.rule, d.evidence, d.actor, d.reason, d.created_at
    FROM reconcile_decisions d
    WHERE d.kind = o.kind AND d.backend_job_id = o.backend_job_id
    ORDER BY d.id DESC LIMIT 1
) AS last ON true"""

# the partial index's predicate word for word, so the planner can use it
_OPEN = "o.state IN ({})".format(", ".join(f"'{state}'" for state in OPEN_STATES))

# $1 kind or NULL, $2 hinted user or NULL, $3 normalised prompt text or NULL
_FILTER = f"""{_OPEN}
  AND ($1::job_kind IS NULL OR o.kind = $1::job_kind)
  AND ($2::text IS NULL OR o.user_id = $2)
  AND ($3::text IS NULL OR strpos(o.prompt_norm, $3) > 0)"""

LIST_OPEN = f"""
SELECT o.kind, o.backend_job_id, o.state, o.user_id, o.prompt, o.file_count, o.event_count,
       o.first_seen_at, last.outcome, last.rule, last.evidence ->> 'reason' AS why,
       (SELECT e.payload -> 'data' -> (o.kind::text || 's') -> 0 ->> 'url'
        FROM orphan_events e
        WHERE e.kind = o.kind AND e.backend_job_id = o.backend_job_id
          AND e.payload -> 'data' -> (o.kind::text || 's') -> 0 ->> 'url' IS NOT NULL
        ORDER BY e.id DESC LIMIT 1) AS media_url
FROM orphans o
{_LATEST}
WHERE {_FILTER}
  AND ($4::timestamptz IS NULL
       OR (o.first_seen_at, o.kind, o.backend_job_id) > ($4, $5::job_kind, $6))
ORDER BY o.first_seen_at, o.kind, o.backend_job_id
LIMIT $7
"""

# review_reason: the latest decision's outcome, kept by a trigger (migration 0011). Grouped
# by the column itself, not an expression of it, so that the groups come in the order of
# `orphans_review_reason` (read alone when the table is vacuumed) without hashing.
COUNT_BY_REASON = f"""
SELECT COALESCE(c.review_reason, 'undecided') AS reason, c.n
FROM (SELECT o.review_reason, count(*) AS n
      FROM orphans o
      WHERE {_FILTER}
      GROUP BY o.review_reason) AS c
ORDER BY 1
"""

ORPHAN = """
SELECT kind, backend_job_id, state, user_id, prompt, prompt_norm, file_count, event_count,
       first_seen_at, last_seen_at, job_id, resolved_at
FROM orphans WHERE kind = $1 AND backend_job_id = $2
"""

EVENTS = """
SELECT id, event_status, payload, received_at, applied_at FROM orphan_events
WHERE kind = $1 AND backend_job_id = $2 ORDER BY id
"""

DECISIONS = """
SELECT id, run_id, job_id, rule, outcome, evidence, actor, reason, created_at
FROM reconcile_decisions WHERE kind = $1 AND backend_job_id = $2 ORDER BY id
"""

# Considered by a decision ($3), the hinted user's ($4), or the same normalised prompt ($5),
# created within the window ($6 s) around the orphan's first sighting ($7).
CANDIDATES = """
SELECT j.id, j.user_id, j.prompt, j.prompt_norm, j.params, j.status::text AS status,
       j.created_at, j.first_webhook_at,
       j.id = ANY($3::text[]) AS considered,
       (SELECT count(*) FROM job_files f WHERE f.job_id = j.id) AS file_count
FROM jobs j
WHERE j.kind = $1::job_kind
  AND (j.id = ANY($3::text[])
       OR ((($4::text IS NOT NULL AND j.user_id = $4) OR j.prompt_norm = $5)
           AND j.created_at BETWEEN $7::timestamptz - make_interval(secs => $6)
                                AND $7::timestamptz + make_interval(secs => $6)))
ORDER BY j.created_at, j.id
LIMIT $2
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Filters:
    kind: Kind | None = None
    user_id: str | None = None
    prompt_norm: str | None = None

    def args(self) -> tuple[Any, ...]:
        return (self.kind.value if self.kind else None, self.user_id,
                self.prompt_norm or None)


async def open_orphans(
    conn: asyncpg.Connection, filters: Filters, *, limit: int,
    after: tuple[dt.datetime, str, str] | None = None,
) -> list[asyncpg.Record]:
    """Open orphans matching `filters`, oldest first, after the cursor key `after`."""
    first_seen, kind, backend_job_id = after or (None, None, None)
    return list(await conn.fetch(LIST_OPEN, *filters.args(), first_seen, kind, backend_job_id,
                                 limit))


async def counts_by_reason(conn: asyncpg.Connection, filters: Filters) -> dict[str, int]:
    return {r["reason"]: r["n"] for r in await conn.fetch(COUNT_BY_REASON, *filters.args())}


@dataclasses.dataclass(frozen=True, slots=True)
class OrphanDetail:
    orphan: asyncpg.Record
    events: list[asyncpg.Record]
    decisions: list[asyncpg.Record]
    candidates: list[asyncpg.Record]


async def orphan_detail(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str, *, window_seconds: float,
    limit: int = 50,
) -> OrphanDetail | None:
    """One orphan, its events in received order, every decision, and its candidate jobs."""
    orphan = await conn.fetchrow(ORPHAN, kind.value, backend_job_id)
    if orphan is None:
        return None
    events = list(await conn.fetch(EVENTS, kind.value, backend_job_id))
    decisions = list(await conn.fetch(DECISIONS, kind.value, backend_job_id))
    considered = sorted({
        str(c["job_id"]) for d in decisions
        for c in (d["evidence"] or {}).get("candidate_jobs", []) if isinstance(c, dict)
        and c.get("job_id")
    } | {d["job_id"] for d in decisions if d["job_id"]})
    candidates = list(await conn.fetch(
        CANDIDATES, kind.value, limit, considered, orphan["user_id"], orphan["prompt_norm"],
        window_seconds, orphan["first_seen_at"],
    ))
    return OrphanDetail(orphan, events, decisions, candidates)
