"""The matching plan: one `reconcile_plan` row per orphan looked at, its decision and its
evidence, computed set-based inside one snapshot. Every query reads through an index."""

from __future__ import annotations

import dataclasses
import datetime as dt

import asyncpg

from gateway.store.statuses import UNCOMPLETABLE_LIST

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
def _paired_in_time_order(ready: str, rule: str) -> str:
    """The orphans of `ready` (each with the user it is for) paired with that user's jobs."""
    return f"""
WITH {ready}, edges AS (
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
       '{rule}',
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


PLAN_USER_PROMPT = _paired_in_time_order(f"""ready AS (
    SELECT o.kind, o.backend_job_id, o.user_id, o.prompt_norm, o.first_seen_at,
           o.file_count, o.event_count
    FROM orphans o
    WHERE o.state = 'unresolved' AND o.user_id IS NOT NULL AND o.prompt_norm IS NOT NULL
      AND {_NOT_PLANNED}
)""", "user_prompt")

# Orphans that name no user, whose prompt's candidates all belong to one user (and the
# other such orphans' with that prompt to the same user): the user is certain, so they
# pair with that user's jobs in time order as a named user's orphans do. Only when that
# user has at least as many such jobs as there are orphans (one more orphan could be an
# image made for nobody) and there is more than one of either (one and one is prompt_only).
PLAN_ONE_USER = _paired_in_time_order(f"""unnamed AS (
    SELECT o.kind, o.backend_job_id, s.user_id, s.users, s.jobs, o.prompt_norm, o.first_seen_at,
           o.file_count, o.event_count
    FROM orphans o
    CROSS JOIN LATERAL (
        SELECT min(j.user_id) AS user_id, count(DISTINCT j.user_id) AS users,
               count(*) AS jobs
        FROM jobs j
        WHERE j.kind = o.kind AND j.prompt_norm = o.prompt_norm
          AND {_CANDIDATE}
          AND {_NOT_TAKEN}
          AND {_IN_WINDOW}
    ) AS s
    WHERE o.state = 'unresolved' AND o.user_id IS NULL AND o.prompt_norm IS NOT NULL
      AND {_NOT_PLANNED}
), grouped AS (
    SELECT u.*, count(*) OVER same_prompt AS orphans, max(u.jobs) OVER same_prompt AS jobs_most
    FROM unnamed u
    WINDOW same_prompt AS (PARTITION BY u.kind, u.prompt_norm)
), ready AS (
    SELECT u.kind, u.backend_job_id, u.user_id, u.prompt_norm, u.first_seen_at,
           u.file_count, u.event_count
    FROM grouped u
    WHERE u.users = 1 AND u.orphans <= u.jobs_most AND (u.orphans > 1 OR u.jobs_most > 1)
      AND NOT EXISTS (SELECT 1 FROM unnamed x
                      WHERE x.kind = u.kind AND x.prompt_norm = u.prompt_norm
                        AND (x.users > 1 OR (x.users = 1 AND x.user_id <> u.user_id)))
)""", "one_user_prompt")

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
WHERE run_id = $1::bigint AND rule IN ('user_prompt', 'one_user_prompt', 'prompt_only')
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
            await conn.execute(PLAN_ONE_USER, run_id, p.window_seconds, p.skew_seconds)
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
