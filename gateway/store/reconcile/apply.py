"""The store's side of applying the plan (`gateway.usecases.matching` decides): the planned
matches read in keyset batches, what each depends on read under the locks, and the decisions
written with their plan rows. Decisions that change nothing (waiting, ambiguous, no
candidate) and expiries are written in one statement."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.matching import MatchState
from gateway.store.database import json_text, rowcount

PLANNED_MATCHES = """
SELECT id, kind, backend_job_id, job_id, rule
FROM reconcile_plan
WHERE run_id = $1 AND outcome = 'matched' AND NOT decided AND id > $2
ORDER BY id
LIMIT $3
"""

# Read after both locks (the jobs' rows, then the backend ids' advisory locks) are held;
# one row per planned match, in order (NULL state: the orphan is gone).
MATCH_STATES = """
SELECT m.i,
       (SELECT o.state FROM orphans o
        WHERE o.kind = m.kind AND o.backend_job_id = m.backend_job_id) AS state,
       (SELECT a.job_id FROM job_aliases a
        WHERE a.kind = m.kind AND a.backend_job_id = m.backend_job_id) AS alias_job_id,
       EXISTS (SELECT 1 FROM job_aliases a
               WHERE a.job_id = m.job_id
                 AND (a.kind, a.backend_job_id) <> (m.kind, m.backend_job_id))
           AS job_has_other_alias,
       EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_id = m.job_id)
           AS job_had_webhook,
       (SELECT count(*) FROM job_files f WHERE f.job_id = m.job_id) AS job_file_count
FROM unnest($1::job_kind[], $2::text[], $3::text[]) WITH ORDINALITY
    AS m(kind, backend_job_id, job_id, i)
ORDER BY m.i
"""

# The decision rows and the plan's note that they are written, in the caller's
# transaction; the evidence added to the plan's comes as JSON text (see
# jobs.INSERT_NOTIFICATIONS). The plan's rows are found by their ids alone (unique across
# runs): with run_id too the planner scans the whole run's rows.
DECIDE_PLANNED = """
WITH d AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
        WITH ORDINALITY AS d(plan_id, job_id, rule, outcome, evidence, i)
), decision AS (
    INSERT INTO reconcile_decisions (run_id, kind, backend_job_id, job_id, rule, outcome,
                                     evidence)
    SELECT $1, p.kind, p.backend_job_id, d.job_id, d.rule, d.outcome,
           p.evidence || d.evidence::jsonb
    FROM d JOIN reconcile_plan p ON p.id = d.plan_id
    WHERE p.id = ANY($2::bigint[])
    ORDER BY d.i
)
UPDATE reconcile_plan p SET decided = true, outcome = d.outcome, job_id = d.job_id
FROM d
WHERE p.id = ANY($2::bigint[]) AND p.id = d.plan_id
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """One row of reconcile_decisions for a planned orphan, and the plan's note of it."""

    plan_id: int
    job_id: str | None
    rule: str
    outcome: str
    evidence: dict[str, Any]


async def decide(
    conn: asyncpg.Connection, run_id: int, decisions: Sequence[Decision]
) -> None:
    """Write the decisions and mark their plan rows decided, in the caller's transaction."""
    if decisions:
        await conn.execute(
            DECIDE_PLANNED, run_id,
            [d.plan_id for d in decisions], [d.job_id for d in decisions],
            [d.rule for d in decisions], [d.outcome for d in decisions],
            [json_text(d.evidence) for d in decisions],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedMatch:
    plan_id: int
    kind: Kind
    backend_job_id: str
    job_id: str
    rule: str


async def planned_matches(
    conn: asyncpg.Connection, run_id: int, *, batch: int = 500
) -> AsyncIterator[PlannedMatch]:
    """The run's planned matches in keyset batches of `batch` rows."""
    after = 0
    while True:
        rows = await conn.fetch(PLANNED_MATCHES, run_id, after, batch)
        for r in rows:
            yield PlannedMatch(r["id"], Kind(r["kind"]), r["backend_job_id"], r["job_id"],
                               r["rule"])
        if len(rows) < batch:
            return
        after = rows[-1]["id"]


def _match_state(r: asyncpg.Record) -> MatchState | None:
    if r["state"] is None:
        return None
    return MatchState(r["state"], r["alias_job_id"], r["job_has_other_alias"],
                      r["job_had_webhook"], r["job_file_count"])


async def match_states(
    conn: asyncpg.Connection, matches: Sequence[PlannedMatch]
) -> list[MatchState | None]:
    """What each match depends on as it is now (None: the orphan is gone), in order; read
    after both locks are held."""
    rows = await conn.fetch(
        MATCH_STATES, [m.kind.value for m in matches], [m.backend_job_id for m in matches],
        [m.job_id for m in matches],
    )
    return [_match_state(r) for r in rows]


async def match_state(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str, job_id: str
) -> MatchState | None:
    """None when there is no such orphan."""
    (row,) = await conn.fetch(MATCH_STATES, [kind.value], [backend_job_id], [job_id])
    return _match_state(row)


# The expiries and the decisions that change nothing, in one statement. An orphan that
# left 'unresolved' meanwhile is not expired (and its expiry is not recorded).
RECORD_UNAPPLIED = """
WITH expired AS (
    UPDATE orphans o SET state = 'unmatched'
    FROM reconcile_plan p
    WHERE p.run_id = $1 AND p.outcome = 'expired'
      AND o.kind = p.kind AND o.backend_job_id = p.backend_job_id
      AND o.state = 'unresolved'
    RETURNING o.kind, o.backend_job_id
)
INSERT INTO reconcile_decisions (run_id, kind, backend_job_id, job_id, rule, outcome, evidence)
SELECT p.run_id, p.kind, p.backend_job_id, p.job_id, p.rule, p.outcome, p.evidence
FROM reconcile_plan p
WHERE p.run_id = $1 AND NOT p.decided
  AND (p.outcome IN ('waiting', 'ambiguous', 'no_candidate')
       OR (p.outcome = 'expired'
           AND EXISTS (SELECT 1 FROM expired e
                       WHERE e.kind = p.kind AND e.backend_job_id = p.backend_job_id)))
"""

UNEXPIRED = """
UPDATE reconcile_plan p SET outcome = 'waiting',
    evidence = evidence || '{"reason": "the orphan left unresolved during the run"}'::jsonb
WHERE p.run_id = $1 AND p.outcome = 'expired' AND NOT p.decided
  AND NOT EXISTS (SELECT 1 FROM reconcile_decisions d
                  WHERE d.run_id = p.run_id AND d.kind = p.kind
                    AND d.backend_job_id = p.backend_job_id)
"""


async def record_unapplied(conn: asyncpg.Connection, run_id: int) -> int:
    """Write the decisions that change nothing, and the expiries; returns rows written."""
    async with conn.transaction():
        status = await conn.execute(RECORD_UNAPPLIED, run_id)
        await conn.execute(UNEXPIRED, run_id)
    return rowcount(status)
