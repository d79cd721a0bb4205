"""The reconciler's SQL: run bookkeeping, the matching plan, applying it, timeouts, retention.

Matching is computed set-based into `reconcile_plan` (one row per orphan looked at, its
decision and evidence) inside one snapshot, then applied in batches through
`orphans.attach_many`, one transaction per batch, so a crash leaves each orphan fully
applied or untouched. Decisions that
change nothing (waiting, ambiguous, no candidate) and expiries are written in one statement.
Every query reads through an index or streams in keyset batches: nothing is loaded whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.matching import LockedOrphan, MatchState, match_obstacle
from gateway.jobs.records import JobUpdate
from gateway.jobs.state import Event, Status
from gateway.store import jobs as store_jobs
from gateway.store import orphans
from gateway.store.database import json_text
from gateway.store.statuses import TERMINAL_LIST, UNCOMPLETABLE_LIST

# pg_try_advisory_lock key: "sorami-r" as a 64-bit integer, held for a whole run
RUN_LOCK_KEY = int.from_bytes(b"sorami-r", "big") & 0x7FFF_FFFF_FFFF_FFFF

REVIEW_OUTCOMES = ("ambiguous", "no_candidate", "expired")

# ---------------------------------------------------------------------------------------
# runs

TRY_RUN_LOCK = """
SELECT pg_try_advisory_lock($1)
"""

RELEASE_RUN_LOCK = """
SELECT pg_advisory_unlock($1)
"""

# Under the run lock, a run still 'running' is one whose process died.
ABANDON_RUNS = """
UPDATE reconcile_runs
SET state = 'failed', finished_at = now(), error = 'interrupted before it finished'
WHERE state = 'running'
"""

CLEAR_PLAN = """
DELETE FROM reconcile_plan WHERE run_id = $1 OR $1 IS NULL
"""

START_RUN = """
INSERT INTO reconcile_runs (dry_run) VALUES ($1) RETURNING id, started_at
"""

FINISH_RUN = """
UPDATE reconcile_runs SET finished_at = now(), state = $2, counts = $3, error = $4
WHERE id = $1
RETURNING finished_at
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    id: int
    started_at: dt.datetime


async def try_run_lock(conn: asyncpg.Connection) -> bool:
    """Take the session-level reconcile lock; False when another run holds it."""
    locked: bool = await conn.fetchval(TRY_RUN_LOCK, RUN_LOCK_KEY)
    return locked


async def release_run_lock(conn: asyncpg.Connection) -> None:
    """Release the run lock; a session that is gone has released it already."""
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        await conn.execute(RELEASE_RUN_LOCK, RUN_LOCK_KEY)


async def start_run(conn: asyncpg.Connection, *, dry_run: bool) -> Run:
    """Record a run (holding the run lock): earlier runs that died are marked failed."""
    await conn.execute(ABANDON_RUNS)
    await conn.execute(CLEAR_PLAN, None)
    row = await conn.fetchrow(START_RUN, dry_run)
    return Run(row["id"], row["started_at"])


async def finish_run(
    conn: asyncpg.Connection, run_id: int, *, state: str, counts: dict[str, Any],
    error: str | None = None,
) -> dt.datetime:
    finished_at: dt.datetime = await conn.fetchval(FINISH_RUN, run_id, state, counts, error)
    return finished_at


async def clear_plan(conn: asyncpg.Connection, run_id: int) -> None:
    await conn.execute(CLEAR_PLAN, run_id)


# ---------------------------------------------------------------------------------------
# the plan: one row per orphan looked at, computed in one snapshot

# What every decision records about the orphan; the prompt itself stays in `orphans`,
# its fingerprint (gateway.jobs.prompts.fingerprint of the normalised prompt) is enough to
# compare it with jobs.
_EVIDENCE = """jsonb_build_object(
    'user_id', o.user_id,
    'prompt_fingerprint',
        CASE WHEN o.prompt_norm IS NOT NULL
             THEN left(encode(sha256(convert_to(o.prompt_norm, 'UTF8')), 'hex'), 12) END,
    'first_seen_at', o.first_seen_at,
    'file_count', o.file_count,
    'event_count', o.event_count)"""

# A job can take an orphan: the partial index jobs_candidates' predicate word for word
# (TIMED_OUT still counts: a late completion completes it), never heard from under its own
# id, no alias yet.
_CANDIDATE = f"""j.status NOT IN {UNCOMPLETABLE_LIST}
      AND j.first_webhook_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM job_aliases a WHERE a.job_id = j.id)
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_id = j.id)"""

# Not already given to an orphan by an earlier step of this run's plan.
_NOT_TAKEN = """NOT EXISTS (SELECT 1 FROM reconcile_plan q
                  WHERE q.run_id = $1 AND q.job_id = j.id AND q.outcome = 'matched')"""

# Created within the window before the orphan was first seen, or a few seconds after.
_IN_WINDOW = """j.created_at BETWEEN o.first_seen_at - make_interval(secs => $2)
                          AND o.first_seen_at + make_interval(secs => $3)"""

_NOT_PLANNED = """NOT EXISTS (SELECT 1 FROM reconcile_plan p
                  WHERE p.run_id = $1 AND p.kind = o.kind
                    AND p.backend_job_id = o.backend_job_id)"""

_PLAN_ROW = """reconcile_plan
    (run_id, kind, backend_job_id, job_id, rule, outcome, first_seen_at, evidence)"""

# An open orphan whose backend id meanwhile has an alias goes to that alias' job.
PLAN_ALIASES = f"""
INSERT INTO {_PLAN_ROW}
SELECT $1, o.kind, o.backend_job_id, a.job_id, 'alias', 'matched', o.first_seen_at,
       {_EVIDENCE} || jsonb_build_object(
           'alias_source', a.source, 'alias_created_at', a.created_at,
           'orphan_state', o.state,
           'reason', 'its backend id is a known alias of the job')
FROM orphans o
JOIN job_aliases a ON a.kind = o.kind AND a.backend_job_id = o.backend_job_id
WHERE o.state IN ('unresolved', 'unmatched')
"""

# Grace: younger than the grace period, an alias may still arrive.
PLAN_WAITING = f"""
INSERT INTO {_PLAN_ROW}
SELECT $1, o.kind, o.backend_job_id, NULL, 'grace', 'waiting', o.first_seen_at,
       {_EVIDENCE} || jsonb_build_object(
           'grace_seconds', $3::float8,
           'age_seconds', round(extract(epoch FROM $2::timestamptz - o.first_seen_at), 3),
           'reason', 'first seen within the grace period')
FROM orphans o
WHERE o.state = 'unresolved'
  AND o.first_seen_at > $2::timestamptz - make_interval(secs => $3)
  AND {_NOT_PLANNED}
"""

# Without a prompt (no original_prompt, no file description) there is no evidence.
PLAN_NO_PROMPT = f"""
INSERT INTO {_PLAN_ROW}
SELECT $1, o.kind, o.backend_job_id, NULL, 'no_prompt', 'no_candidate', o.first_seen_at,
       {_EVIDENCE} || jsonb_build_object(
           'reason', 'its events carry no prompt (no original_prompt, no file description)')
FROM orphans o
WHERE o.state = 'unresolved' AND o.prompt_norm IS NULL AND {_NOT_PLANNED}
"""

# Orphans that name a user: only that user's candidates; several orphans and candidates of
# one (kind, user, prompt) pair one to one in time order. Only orphans with a candidate in
# their own window take a rank, and only candidates in some orphan's window, so a job too
# old for every orphan does not shift the pairing; a pair that still falls outside the
# orphan's window is left for review.
PLAN_USER_PROMPT = f"""
WITH ready AS (
    SELECT o.kind, o.backend_job_id, o.user_id, o.prompt_norm, o.first_seen_at,
           o.file_count, o.event_count
    FROM orphans o
    WHERE o.state = 'unresolved' AND o.user_id IS NOT NULL AND o.prompt_norm IS NOT NULL
      AND {_NOT_PLANNED}
), edges AS (
    SELECT o.kind, o.backend_job_id, j.id AS job_id
    FROM ready o
    JOIN jobs j ON j.kind = o.kind AND j.prompt_norm = o.prompt_norm
               AND j.user_id = o.user_id
    WHERE {_CANDIDATE}
      AND {_NOT_TAKEN}
      AND {_IN_WINDOW}
), counted AS (
    SELECT o.kind, o.backend_job_id, o.user_id, o.prompt_norm, o.first_seen_at,
           o.file_count, o.event_count, count(e.job_id) AS candidates
    FROM ready o
    LEFT JOIN edges e ON e.kind = o.kind AND e.backend_job_id = o.backend_job_id
    GROUP BY o.kind, o.backend_job_id, o.user_id, o.prompt_norm, o.first_seen_at,
             o.file_count, o.event_count
), orphan_ranks AS (
    SELECT c.kind, c.backend_job_id, c.user_id, c.prompt_norm, c.first_seen_at,
           row_number() OVER (PARTITION BY c.kind, c.user_id, c.prompt_norm
                              ORDER BY c.first_seen_at, c.backend_job_id) AS rank
    FROM counted c
    WHERE c.candidates > 0
), job_ranks AS (
    SELECT j.id, j.kind, j.user_id, j.prompt_norm, j.created_at,
           row_number() OVER (PARTITION BY j.kind, j.user_id, j.prompt_norm
                              ORDER BY j.created_at, j.id) AS rank
    FROM jobs j
    WHERE j.id IN (SELECT e.job_id FROM edges e)
), pairs AS (
    SELECT o.kind, o.backend_job_id, o.rank, j.id AS job_id, j.created_at AS job_created_at,
           COALESCE(j.created_at BETWEEN o.first_seen_at - make_interval(secs => $2)
                                     AND o.first_seen_at + make_interval(secs => $3),
                    false) AS in_window
    FROM orphan_ranks o
    LEFT JOIN job_ranks j ON j.kind = o.kind AND j.user_id = o.user_id
                         AND j.prompt_norm = o.prompt_norm AND j.rank = o.rank
)
INSERT INTO {_PLAN_ROW}
SELECT $1, o.kind, o.backend_job_id,
       CASE WHEN p.in_window THEN p.job_id END,
       'user_prompt',
       CASE WHEN p.in_window THEN 'matched'
            WHEN p.job_id IS NOT NULL THEN 'ambiguous'
            ELSE 'no_candidate' END,
       o.first_seen_at,
       {_EVIDENCE} || jsonb_build_object(
           'candidates', o.candidates,
           'rank', p.rank,
           'paired_job_id', p.job_id,
           'paired_job_created_at', p.job_created_at,
           'window_seconds', $2::float8,
           'reason', CASE
               WHEN p.in_window THEN 'paired in time order with this user''s job'
               WHEN p.job_id IS NOT NULL
                   THEN 'the job paired in time order lies outside this orphan''s window'
               WHEN o.candidates > 0
                   THEN 'every such job of this user is paired with an earlier orphan'
               ELSE 'no job of this user with this prompt in the window' END)
FROM counted o
LEFT JOIN pairs p ON p.kind = o.kind AND p.backend_job_id = o.backend_job_id
"""

# Orphans without a user: only when exactly one candidate across all users has the prompt
# and exactly one unresolved orphan carries it. Candidates are counted up to 5 (more
# changes nothing: it is ambiguous either way).
PLAN_PROMPT_ONLY = f"""
WITH ready AS (
    SELECT o.kind, o.backend_job_id, o.user_id, o.prompt_norm, o.first_seen_at,
           o.file_count, o.event_count
    FROM orphans o
    WHERE o.state = 'unresolved' AND o.user_id IS NULL AND o.prompt_norm IS NOT NULL
      AND {_NOT_PLANNED}
), evaluated AS (
    SELECT o.*, c.candidates, c.job_id, c.jobs,
           (SELECT count(*) FROM (SELECT 1 FROM orphans x
                                  WHERE x.kind = o.kind AND x.prompt_norm = o.prompt_norm
                                    AND x.state = 'unresolved'
                                    AND NOT EXISTS (
                                        SELECT 1 FROM reconcile_plan q
                                        WHERE q.run_id = $1 AND q.kind = x.kind
                                          AND q.backend_job_id = x.backend_job_id
                                          AND q.outcome IN ('matched', 'expired'))
                                  LIMIT 2) AS carriers) AS orphans_with_prompt
    FROM ready o
    CROSS JOIN LATERAL (
        SELECT count(*) AS candidates, min(j.id) AS job_id,
               jsonb_agg(jsonb_build_object('job_id', j.id, 'user_id', j.user_id,
                                            'created_at', j.created_at)
                         ORDER BY j.created_at) AS jobs
        FROM (SELECT j.id, j.user_id, j.created_at
              FROM jobs j
              WHERE j.kind = o.kind AND j.prompt_norm = o.prompt_norm
                AND {_CANDIDATE}
                AND {_NOT_TAKEN}
                AND {_IN_WINDOW}
              ORDER BY j.created_at
              LIMIT 5) AS j
    ) AS c
)
INSERT INTO {_PLAN_ROW}
SELECT $1, o.kind, o.backend_job_id,
       CASE WHEN o.candidates = 1 AND o.orphans_with_prompt = 1 THEN o.job_id END,
       'prompt_only',
       CASE WHEN o.candidates = 0 THEN 'no_candidate'
            WHEN o.candidates = 1 AND o.orphans_with_prompt = 1 THEN 'matched'
            ELSE 'ambiguous' END,
       o.first_seen_at,
       {_EVIDENCE} || jsonb_build_object(
           'candidates', o.candidates,
           'candidate_jobs', COALESCE(o.jobs, '[]'::jsonb),
           'orphans_with_prompt', o.orphans_with_prompt,
           'window_seconds', $2::float8,
           'reason', CASE
               WHEN o.candidates = 0 THEN 'no job with this prompt in the window'
               WHEN o.candidates > 1
                   THEN 'several jobs have this prompt and the orphan names no user'
               WHEN o.orphans_with_prompt > 1
                   THEN 'several unresolved orphans carry this prompt'
               ELSE 'the one job with this prompt, and the one orphan carrying it' END)
FROM evaluated o
"""

# Still unmatched after --expire-after: left to an operator for good.
PLAN_EXPIRE = """
UPDATE reconcile_plan
SET outcome = 'expired',
    evidence = evidence || jsonb_build_object('outcome_before_expiry', outcome,
                                              'expire_after_seconds', $3::float8)
WHERE run_id = $1 AND outcome IN ('ambiguous', 'no_candidate')
  AND first_seen_at <= $2::timestamptz - make_interval(secs => $3)
"""

# Matches and expiries are final within a run; the rest of a round is decided again.
PLAN_SETTLED = """
SELECT count(*) FROM reconcile_plan WHERE run_id = $1 AND outcome IN ('matched', 'expired')
"""

# Undecided orphans are decided again; the earlier decision is kept aside (under the
# run's negated id) and put back unless the new one is a match: its evidence tells what
# the orphan competed with.
PLAN_RECONSIDER = """
UPDATE reconcile_plan SET run_id = -run_id
WHERE run_id = $1::bigint AND rule IN ('user_prompt', 'prompt_only')
  AND outcome IN ('ambiguous', 'no_candidate')
"""

PLAN_DROP_REDECIDED = """
DELETE FROM reconcile_plan p
USING reconcile_plan a
WHERE p.run_id = $1::bigint AND a.run_id = -$1::bigint AND p.kind = a.kind
  AND p.backend_job_id = a.backend_job_id AND p.outcome <> 'matched'
"""

PLAN_PUT_BACK = """
UPDATE reconcile_plan a SET run_id = $1::bigint
WHERE a.run_id = -$1::bigint
  AND NOT EXISTS (SELECT 1 FROM reconcile_plan p
                  WHERE p.run_id = $1::bigint AND p.kind = a.kind
                    AND p.backend_job_id = a.backend_job_id)
"""

PLAN_CLEAR_ASIDE = """
DELETE FROM reconcile_plan WHERE run_id = -$1::bigint
"""

# The plan's rows are written in the plan's own transaction, which autovacuum cannot see:
# without statistics the planner takes the table for empty and checks "not taken yet" by
# reading every row of the run for each candidate (quadratic: 17 s at 10,000 orphans).
# ANALYZE sees the transaction's own rows.
ANALYZE_PLAN = """
ANALYZE reconcile_plan
"""

PLAN_COUNTS = """
SELECT outcome, count(*) AS n FROM reconcile_plan WHERE run_id = $1 GROUP BY outcome
"""


@dataclasses.dataclass(frozen=True, slots=True)
class PlanParameters:
    run_at: dt.datetime
    grace_seconds: float
    window_seconds: float
    expire_after_seconds: float
    skew_seconds: float


async def build_plan(conn: asyncpg.Connection, run_id: int, p: PlanParameters) -> dict[str, int]:
    """Decide for every open orphan, in one snapshot; returns the count per outcome.

    A match takes a job and an orphan out of the running and an expiry an orphan, which
    can settle other orphans (one job left for a prompt, one orphan left carrying it, a
    pairing in time order no longer shifted). The matching steps are repeated, with what
    is settled left out, until a round settles nothing more: the plan is what any number
    of runs in a row would decide, so a run right after it changes nothing.
    """
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute(PLAN_ALIASES, run_id)
        await conn.execute(PLAN_WAITING, run_id, p.run_at, p.grace_seconds)
        await conn.execute(PLAN_NO_PROMPT, run_id)
        settled = await conn.fetchval(PLAN_SETTLED, run_id)
        first_round = True
        while True:
            await conn.execute(ANALYZE_PLAN)
            await conn.execute(PLAN_USER_PROMPT, run_id, p.window_seconds, p.skew_seconds)
            await conn.execute(ANALYZE_PLAN)
            await conn.execute(PLAN_PROMPT_ONLY, run_id, p.window_seconds, p.skew_seconds)
            await conn.execute(PLAN_EXPIRE, run_id, p.run_at, p.expire_after_seconds)
            if not first_round:
                await conn.execute(PLAN_DROP_REDECIDED, run_id)
                await conn.execute(PLAN_PUT_BACK, run_id)
            now_settled = await conn.fetchval(PLAN_SETTLED, run_id)
            if now_settled == settled:
                break
            settled, first_round = now_settled, False
            await conn.execute(PLAN_CLEAR_ASIDE, run_id)
            await conn.execute(PLAN_RECONSIDER, run_id)
        await conn.execute(PLAN_CLEAR_ASIDE, run_id)
    return await plan_counts(conn, run_id)


async def plan_counts(conn: asyncpg.Connection, run_id: int) -> dict[str, int]:
    return {r["outcome"]: r["n"] for r in await conn.fetch(PLAN_COUNTS, run_id)}


# ---------------------------------------------------------------------------------------
# applying matches, a batch per transaction

# A batch's transaction (matches applied, jobs timed out) commits without waiting for its
# WAL flush. Atomicity is unchanged (each transaction is still all or nothing); a database
# crash may forget the last few commits, which leaves those orphans (or stale jobs) as they
# were, and the next run redoes them from the orphans' stored events. Waiting for a flush per
# batch would cost a disk sync each, serialized by NOTIFY's commit lock. Set for the
# transaction only (is_local): the connection's next transactions wait for their flush again.
ASYNC_COMMIT = """
SELECT set_config('synchronous_commit', 'off', true)
"""

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
           AS job_had_webhook
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
class _Decision:
    plan_id: int
    job_id: str | None
    rule: str
    outcome: str
    evidence: dict[str, Any]


async def _decide(conn: asyncpg.Connection, run_id: int, decisions: list[_Decision]) -> None:
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


@dataclasses.dataclass(frozen=True, slots=True)
class MatchResult:
    matched: bool
    reason: str | None = None
    job_status: str | None = None
    replayed: int = 0
    notifications: int = 0
    # applying it failed (recorded as waiting, rule apply_failed)
    failed: bool = False


async def commit_without_flush(conn: asyncpg.Connection) -> None:
    """The caller's open transaction commits without waiting for its WAL flush."""
    assert conn.is_in_transaction(), "synchronous_commit is set per transaction"
    await conn.execute(ASYNC_COMMIT)


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


async def apply_match(conn: asyncpg.Connection, run_id: int, m: PlannedMatch) -> MatchResult:
    """`apply_matches` of one match."""
    (result,) = await apply_matches(conn, run_id, [m])
    return result


async def apply_matches(
    conn: asyncpg.Connection, run_id: int, matches: Sequence[PlannedMatch]
) -> list[MatchResult]:
    """Apply planned matches in the caller's transaction, those that still hold.

    Locks the jobs (in id order), then the backend ids (the order delivery's attach uses),
    checks again what the plan saw, and attaches the matches that still hold with one
    `orphans.attach_many`; a match that no longer holds is recorded as waiting for the
    next run. Either way every decision row is written in the same transaction. One result
    per match, in order.
    """
    await commit_without_flush(conn)
    jobs = await store_jobs.lock_many(conn, [m.job_id for m in matches])
    await orphans.lock_backend_ids(conn, [(m.kind, m.backend_job_id) for m in matches])
    states = await conn.fetch(
        MATCH_STATES, [m.kind.value for m in matches], [m.backend_job_id for m in matches],
        [m.job_id for m in matches],
    )
    results: list[MatchResult | None] = [None] * len(matches)
    decisions: list[_Decision] = []
    holding: list[tuple[int, orphans.Pair]] = []
    for index, (m, row) in enumerate(zip(matches, states, strict=True)):
        job = jobs.get(m.job_id)
        reason = match_obstacle(m.rule, m.job_id, job, _match_state(row))
        if reason is not None or job is None:
            decisions.append(_Decision(m.plan_id, None, "recheck", "waiting",
                                       {"reason": reason, "planned_job_id": m.job_id}))
            results[index] = MatchResult(False, reason=reason)
        else:
            holding.append((index, orphans.Pair(m.kind, m.backend_job_id, job)))
    # under both locks nobody else can alias either side, so nothing should be refused
    attached = await orphans.attach_many(conn, [p for _, p in holding], source="reconciler")
    for (index, pair), done in zip(holding, attached, strict=True):
        m = matches[index]
        if isinstance(done, orphans.Refused):
            decisions.append(_failure(m.plan_id, done.reason))
            results[index] = MatchResult(False, reason=done.reason, failed=True)
            continue
        status = done.job.state.status.value
        decisions.append(_Decision(
            m.plan_id, m.job_id, m.rule, "matched",
            {"job_user_id": pair.job.user_id, "job_created_at": pair.job.created_at,
             "replayed_events": len(done.transitions), "job_status": status}))
        results[index] = MatchResult(True, job_status=status, replayed=len(done.transitions),
                                     notifications=len(done.notification_ids))
    await _decide(conn, run_id, decisions)
    return [r for r in results if r is not None]


def _match_state(r: asyncpg.Record) -> MatchState | None:
    if r["state"] is None:
        return None
    return MatchState(r["state"], r["alias_job_id"], r["job_has_other_alias"],
                      r["job_had_webhook"])


async def match_state(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str, job_id: str
) -> MatchState | None:
    """None when there is no such orphan."""
    (row,) = await conn.fetch(MATCH_STATES, [kind.value], [backend_job_id], [job_id])
    return _match_state(row)


def _failure(plan_id: int, error: str) -> _Decision:
    return _Decision(plan_id, None, "apply_failed", "waiting",
                     {"reason": "applying the match failed", "error": error[:500]})


async def record_failure(
    conn: asyncpg.Connection, run_id: int, plan_id: int, error: str
) -> None:
    """An orphan whose attach failed: recorded as waiting (the next run tries again)."""
    await _decide(conn, run_id, [_failure(plan_id, error)])


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
    return _rowcount(status)


# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# stale jobs: no change for longer than their kind's timeout become TIMED_OUT

# The predicate matches the partial index jobs_active_updated word for word.
STALE_JOBS = f"""
SELECT id, updated_at FROM jobs
WHERE kind = $1 AND status NOT IN {TERMINAL_LIST}
  AND updated_at < $2
  AND (updated_at, id) > ($3, $4)
ORDER BY updated_at, id
LIMIT $5
"""

COUNT_STALE_JOBS = f"""
SELECT count(*) FROM jobs
WHERE kind = $1 AND status NOT IN {TERMINAL_LIST}
  AND updated_at < $2
"""

# Locks the jobs still active and unchanged since the cutoff (a row updated meanwhile is
# re-checked against the WHERE clause once its lock is granted); a job whose row is busy
# right now is being heard from, so it is skipped rather than waited for.
LOCK_STALE_JOBS = f"""
SELECT {store_jobs.JOB_COLUMNS} FROM jobs j
WHERE j.id = ANY($1::text[]) AND j.updated_at < $2
  AND j.status NOT IN {TERMINAL_LIST}
ORDER BY j.id
FOR UPDATE SKIP LOCKED
"""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


async def stale_jobs(
    conn: asyncpg.Connection, kind: Kind, cutoff: dt.datetime, *, batch: int = 100
) -> AsyncIterator[list[str]]:
    """Ids of active jobs of `kind` unchanged since before `cutoff`, in keyset batches."""
    after: tuple[dt.datetime, str] = (_EPOCH, "")
    while True:
        rows = await conn.fetch(STALE_JOBS, kind.value, cutoff, *after, batch)
        if rows:
            yield [r["id"] for r in rows]
        if len(rows) < batch:
            return
        after = (rows[-1]["updated_at"], rows[-1]["id"])


async def count_stale_jobs(conn: asyncpg.Connection, kind: Kind, cutoff: dt.datetime) -> int:
    count: int = await conn.fetchval(COUNT_STALE_JOBS, kind.value, cutoff)
    return count


async def time_out(
    conn: asyncpg.Connection, job_ids: list[str], cutoff: dt.datetime, message: str
) -> int:
    """Time out, in the caller's transaction, those of `job_ids` still active and unchanged
    since `cutoff`, each through the state machine (which notifies its owner), written in
    bulk by `jobs.apply_many`; returns how many."""
    update = JobUpdate(event=Event(Status.TIMED_OUT), source="timeout", message=message)
    await commit_without_flush(conn)
    rows = await conn.fetch(LOCK_STALE_JOBS, job_ids, cutoff)
    replayed = await store_jobs.apply_many(
        conn, [(store_jobs.locked_job(row), (update,)) for row in rows]
    )
    return sum(r.applied[0].transition.applied for r in replayed)


# ---------------------------------------------------------------------------------------
# retention

# One batch: the oldest rows' physical addresses from the index, then a TID scan; a row
# updated meanwhile has moved and is left alone (its new version no longer matches).
PRUNE_DELIVERIES = """
DELETE FROM webhook_deliveries
WHERE ctid = ANY(ARRAY(SELECT ctid FROM webhook_deliveries
                       WHERE received_at < $1 LIMIT $2))
"""

PRUNE_OUTBOX = """
DELETE FROM outbox
WHERE ctid = ANY(ARRAY(SELECT ctid FROM outbox WHERE delivered_at < $1 LIMIT $2))
"""

COUNT_PRUNABLE = """
SELECT (SELECT count(*) FROM webhook_deliveries WHERE received_at < $1) AS webhook_deliveries,
       (SELECT count(*) FROM outbox WHERE delivered_at < $1) AS outbox
"""


async def prune(conn: asyncpg.Connection, cutoff: dt.datetime, *, batch: int = 5000) -> dict[
    str, int
]:
    """Delete dedupe records and delivered outbox rows older than `cutoff`, in batches."""
    pruned: dict[str, int] = {}
    for table, query in (("webhook_deliveries", PRUNE_DELIVERIES), ("outbox", PRUNE_OUTBOX)):
        total = 0
        while True:
            deleted = _rowcount(await conn.execute(query, cutoff, batch))
            total += deleted
            if deleted < batch:
                break
        pruned[table] = total
    return pruned


async def count_prunable(conn: asyncpg.Connection, cutoff: dt.datetime) -> dict[str, int]:
    row = await conn.fetchrow(COUNT_PRUNABLE, cutoff)
    return {"webhook_deliveries": row["webhook_deliveries"], "outbox": row["outbox"]}


# The audit trail: `reconcile_decisions` gets a row per open orphan per pass, and
# `reconcile_runs` a row per pass. Kept forever, whatever their age:
# - decisions that changed an orphan's state: `matched` and `assigned` (the proof of a
#   link: which rule or operator put the orphan on its job, and the evidence), `dismissed`
#   (the operator's reason) and `expired` (why the orphan was left unmatched). An orphan
#   changes state a few times at most and orphans are never deleted, so these rows grow
#   with the orphans, not with the passes;
# - the latest decision of an orphan still open (unresolved or unmatched): the reason that
#   `sorami-reconcile orphans` and the review table show;
# - a run that a kept decision belongs to (deleting it would cascade to the decision), a
#   run not finished, and the latest successful real run (its time is the
#   last-success metric).
# Older than the retention, everything else goes: the `waiting`, `ambiguous` and
# `no_candidate` rows (rules grace, no_prompt, user_prompt, prompt_only, recheck,
# apply_failed) that a later decision of the same orphan supersedes or whose orphan is no
# longer open, and the runs left without decisions.

# `d` is a decision: true when it is the latest decision of an orphan still open.
_LATEST_OF_OPEN_ORPHAN = """EXISTS (
    SELECT 1 FROM orphans o
    WHERE o.kind = d.kind AND o.backend_job_id = d.backend_job_id
      AND o.state IN ('unresolved', 'unmatched')
      AND NOT EXISTS (SELECT 1 FROM reconcile_decisions n
                      WHERE n.kind = d.kind AND n.backend_job_id = d.backend_job_id
                        AND n.id > d.id))"""

# `r` is a run: true when it is the latest successful real run.
_LATEST_SUCCESS = """r.id IS NOT DISTINCT FROM (SELECT s.id FROM reconcile_runs s
              WHERE s.state = 'succeeded' AND NOT s.dry_run
              ORDER BY s.finished_at DESC, s.id DESC LIMIT 1)"""

def _prune_batch(table: str, alias: str, at: str, candidates: str, kept: str) -> str:
    """One batch, one statement (so its row locks last one short transaction): the next
    `$4` rows of `table` matching `candidates`, older than `$1`, in (`at`, id) order after
    ($2, $3), read from an index; those not `kept` deleted by their physical address (a TID
    scan; a row updated meanwhile is left alone). The caller continues after the last
    candidate, so a kept row is read once per pass, not once per batch."""
    return f"""
WITH batch AS (
    SELECT {alias}.ctid, {alias}.id, {alias}.{at} FROM {table} {alias}
    WHERE {candidates} AND {alias}.{at} < $1
      AND ({alias}.{at}, {alias}.id) > ($2::timestamptz, $3::bigint)
    ORDER BY {alias}.{at}, {alias}.id
    LIMIT $4
), pruned AS (
    DELETE FROM {table} {alias}
    WHERE {alias}.ctid = ANY(ARRAY(SELECT b.ctid FROM batch b))
      AND NOT ({kept})
    RETURNING {alias}.id
)
SELECT (SELECT count(*) FROM batch) AS scanned,
       (SELECT count(*) FROM pruned) AS pruned,
       last.{at} AS after_at, last.id AS after_id
FROM (SELECT 1) AS one
LEFT JOIN (SELECT b.{at}, b.id FROM batch b
           ORDER BY b.{at} DESC, b.id DESC LIMIT 1) AS last ON true
"""


# Decisions from the partial index reconcile_decisions_prunable (its predicate word for
# word).
PRUNE_DECISIONS = _prune_batch(
    "reconcile_decisions", "d", "created_at",
    "d.outcome IN ('waiting', 'ambiguous', 'no_candidate')",
    _LATEST_OF_OPEN_ORPHAN,
)

# Runs finished before the cutoff, from reconcile_runs_finished; the decisions' foreign
# key is looked up through reconcile_decisions_run.
PRUNE_RUNS = _prune_batch(
    "reconcile_runs", "r", "finished_at",
    "r.finished_at IS NOT NULL",
    "r.state = 'running' OR EXISTS (SELECT 1 FROM reconcile_decisions d WHERE d.run_id = r.id)"
    f" OR {_LATEST_SUCCESS}",
)

# What a real pass would prune (for a dry run): the runs counted are those whose every
# decision would be pruned too.
_PRUNABLE_DECISION = f"""(d.outcome IN ('waiting', 'ambiguous', 'no_candidate')
      AND d.created_at < $1 AND NOT {_LATEST_OF_OPEN_ORPHAN})"""

COUNT_PRUNABLE_AUDIT = f"""
SELECT (SELECT count(*) FROM reconcile_decisions d
        WHERE {_PRUNABLE_DECISION}) AS reconcile_decisions,
       (SELECT count(*) FROM reconcile_runs r
        WHERE r.finished_at IS NOT NULL AND r.finished_at < $1 AND r.state <> 'running'
          AND NOT {_LATEST_SUCCESS}
          AND NOT EXISTS (SELECT 1 FROM reconcile_decisions d
                          WHERE d.run_id = r.id AND NOT {_PRUNABLE_DECISION}))
           AS reconcile_runs
"""

_BEFORE_ALL = (dt.datetime.min.replace(tzinfo=dt.UTC), 0)


async def prune_audit(
    conn: asyncpg.Connection, cutoff: dt.datetime, *, batch: int = 5000
) -> dict[str, int]:
    """Delete the audit rows older than `cutoff` that are not kept forever (see above),
    decisions first, then the runs they leave empty; each batch of at most `batch`
    candidates is one statement. Returns the rows deleted per table."""
    pruned: dict[str, int] = {}
    for table, query in (("reconcile_decisions", PRUNE_DECISIONS),
                         ("reconcile_runs", PRUNE_RUNS)):
        total = 0
        after: tuple[dt.datetime, int] = _BEFORE_ALL
        while True:
            row = await conn.fetchrow(query, cutoff, *after, batch)
            total += row["pruned"]
            if row["scanned"] < batch:
                break
            after = (row["after_at"], row["after_id"])
        pruned[table] = total
    return pruned


async def count_prunable_audit(conn: asyncpg.Connection, cutoff: dt.datetime) -> dict[str, int]:
    row = await conn.fetchrow(COUNT_PRUNABLE_AUDIT, cutoff)
    return {"reconcile_decisions": row["reconcile_decisions"],
            "reconcile_runs": row["reconcile_runs"]}


# ---------------------------------------------------------------------------------------
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


def _rowcount(status: str) -> int:
    """'DELETE 12' / 'INSERT 0 12' -> 12."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
