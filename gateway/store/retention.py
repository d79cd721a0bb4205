"""Retention: old dedupe records, settled outbox rows and the reconciler's audit trail are
deleted in keyset batches, each its own short transaction; the usage changes no create has
folded are folded."""

from __future__ import annotations

import datetime as dt

import asyncpg

from gateway.store.database import rowcount

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
            deleted = rowcount(await conn.execute(query, cutoff, batch))
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
# `no_candidate` rows (rules grace, no_prompt, user_prompt, one_user_prompt, prompt_only, recheck,
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


# The usage changes that no create under a limit folded (migration 0013): a batch of users
# per call, each call its own transaction holding those users' locks until it commits.
FOLD_USAGE = """
SELECT seen, folded, busy, last_user, last_kind::text FROM sorami_fold_usage_v1($1, $2, $3)
"""

COUNT_USAGE_CHANGES = "SELECT count(*) FROM job_usage_changes"


async def fold_usage(conn: asyncpg.Connection, *, pairs: int = 100) -> dict[str, int]:
    """Fold every user's usage changes into the user's usage row, or drop them for a user
    without one (their first create under a limit counts from the jobs), `pairs` users (and
    kind) per transaction. A user whose create holds the lock is left to that create. Returns
    the changes folded."""
    assert not conn.is_in_transaction(), "each batch commits, releasing its users' locks"
    folded = 0
    after: tuple[str | None, str | None] = (None, None)
    while True:
        row = await conn.fetchrow(FOLD_USAGE, *after, pairs)
        folded += row["folded"]
        if row["seen"] < pairs:
            break
        after = (row["last_user"], row["last_kind"])
    return {"job_usage_changes": folded}


async def count_usage_changes(conn: asyncpg.Connection) -> dict[str, int]:
    """What fold_usage would fold now (less what creates fold meanwhile)."""
    return {"job_usage_changes": await conn.fetchval(COUNT_USAGE_CHANGES)}
