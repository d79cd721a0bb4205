"""Apply the reconciler's planned matches: those that still hold reach their jobs.

A batch per transaction: the jobs locked (in id order), then the backend ids (the order
delivery's attach uses), the plan checked again under both locks with the matching rules
(`gateway.jobs.matching`), the matches that still hold attached with one
`orphans.attach_many`, and every decision written, so a crash leaves each orphan fully
applied or untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import asyncpg

from gateway.jobs.matching import match_obstacle
from gateway.store import jobs as store_jobs
from gateway.store import orphans
from gateway.store.database import commit_without_flush
from gateway.store.reconcile import apply as store_matches
from gateway.store.reconcile.apply import Decision, PlannedMatch


@dataclasses.dataclass(frozen=True, slots=True)
class MatchResult:
    matched: bool
    reason: str | None = None
    job_status: str | None = None
    replayed: int = 0
    notifications: int = 0
    # applying it failed (recorded as waiting, rule apply_failed)
    failed: bool = False


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
    # Atomicity is unchanged; a database crash may forget the last few batches' commits,
    # which the next run redoes from the orphans' stored events. Waiting for a flush per
    # batch would cost a disk sync each, serialized by NOTIFY's commit lock.
    await commit_without_flush(conn)
    jobs = await store_jobs.lock_many(conn, [m.job_id for m in matches])
    await orphans.lock_backend_ids(conn, [(m.kind, m.backend_job_id) for m in matches])
    states = await store_matches.match_states(conn, matches)
    results: list[MatchResult | None] = [None] * len(matches)
    decisions: list[Decision] = []
    holding: list[tuple[int, orphans.Pair]] = []
    for index, (m, state) in enumerate(zip(matches, states, strict=True)):
        job = jobs.get(m.job_id)
        reason = match_obstacle(m.rule, m.job_id, job, state)
        if reason is not None or job is None:
            decisions.append(Decision(m.plan_id, None, "recheck", "waiting",
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
        decisions.append(Decision(
            m.plan_id, m.job_id, m.rule, "matched",
            {"job_user_id": pair.job.user_id, "job_created_at": pair.job.created_at,
             "replayed_events": len(done.transitions), "job_status": status}))
        results[index] = MatchResult(True, job_status=status, replayed=len(done.transitions),
                                     notifications=len(done.notification_ids))
    await store_matches.decide(conn, run_id, decisions)
    return [r for r in results if r is not None]


def _failure(plan_id: int, error: str) -> Decision:
    return Decision(plan_id, None, "apply_failed", "waiting",
                     {"reason": "applying the match failed", "error": error[:500]})


async def record_failure(
    conn: asyncpg.Connection, run_id: int, plan_id: int, error: str
) -> None:
    """An orphan whose attach failed: recorded as waiting (the next run tries again)."""
    await store_matches.decide(conn, run_id, [_failure(plan_id, error)])
