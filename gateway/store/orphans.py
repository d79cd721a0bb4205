"""Orphans: verified webhooks whose job id is neither our job nor a known alias.

`record` keeps every such event whole, grouped per (kind, backend job id), with the hints
the reconciler matches on. `attach` is the one way an orphan reaches its job, used by
delivery (the backend answered its own id), the reconciler and operators: it records the
alias and replays the orphan's events through the state machine in received order, in the
caller's transaction, so a crash leaves the orphan either fully applied or untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode_stored
from gateway.jobs.records import JobUpdate, LockedJob
from gateway.jobs.state import Transition
from gateway.store import jobs as store_jobs
from gateway.store.errors import Duplicate

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

# Every backend id of a batch, in key order, so that two batches cannot deadlock.
LOCK_BACKEND_IDS = """
SELECT pg_advisory_xact_lock(k.key)
FROM (SELECT DISTINCT hashtextextended(b.kind || ':' || b.backend_job_id, 0) AS key
      FROM unnest($1::text[], $2::text[]) AS b(kind, backend_job_id)) AS k
ORDER BY k.key
"""

# Any conflict (the backend id taken, or the job already aliased) skips that pair and
# nothing else; `owner` then says who has the backend id (NULL: the job has another alias).
# The subquery reads the aliases from before the statement, RETURNING those it added.
INSERT_ALIASES = """
WITH pairs AS (
    SELECT * FROM unnest($1::job_kind[], $2::text[], $3::text[]) WITH ORDINALITY
        AS p(kind, backend_job_id, job_id, i)
), inserted AS (
    INSERT INTO job_aliases (kind, backend_job_id, job_id, source)
    SELECT p.kind, p.backend_job_id, p.job_id, $4 FROM pairs p ORDER BY p.i
    ON CONFLICT DO NOTHING
    RETURNING kind, backend_job_id, job_id
)
SELECT p.i, COALESCE((SELECT a.job_id FROM job_aliases a
                      WHERE a.kind = p.kind AND a.backend_job_id = p.backend_job_id),
                     n.job_id) AS owner
FROM pairs p
LEFT JOIN inserted n ON n.kind = p.kind AND n.backend_job_id = p.backend_job_id
ORDER BY p.i
"""

# Read through the index by `= ANY` (a join with the unnest would read the whole table;
# $3 holds each kind once, or the planner overestimates the matches), then narrowed to
# the exact pairs.
PENDING_EVENTS = """
SELECT e.id, e.kind, e.backend_job_id, e.dedupe_key, e.payload
FROM orphan_events e
WHERE e.kind = ANY($3::job_kind[]) AND e.backend_job_id = ANY($2::text[])
  AND (e.kind, e.backend_job_id) IN (SELECT * FROM unnest($1::job_kind[], $2::text[]))
  AND e.applied_at IS NULL
ORDER BY e.kind, e.backend_job_id, e.received_at, e.id
FOR UPDATE OF e
"""

# The replayed events marked applied, their dedupe records linked to the job, the orphans
# resolved: data-modifying CTEs all run, once. `= ANY` makes each find its rows by index
# ($8: each kind once).
SETTLE_REPLAYED = """
WITH marked AS (
    UPDATE orphan_events SET applied_at = now() WHERE id = ANY($1::bigint[])
), linked AS (
    UPDATE webhook_deliveries d SET job_id = l.job_id
    FROM unnest($2::text[], $3::text[]) AS l(dedupe_key, job_id)
    WHERE d.dedupe_key = ANY($2::text[]) AND d.dedupe_key = l.dedupe_key
)
UPDATE orphans o SET state = $7, job_id = r.job_id, resolved_at = now()
FROM unnest($4::job_kind[], $5::text[], $6::text[]) AS r(kind, backend_job_id, job_id)
WHERE o.kind = ANY($8::job_kind[]) AND o.backend_job_id = ANY($5::text[])
  AND o.kind = r.kind AND o.backend_job_id = r.backend_job_id
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


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    """A backend id to attach to a job the caller has locked."""

    kind: Kind
    backend_job_id: str
    job: LockedJob


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """A pair left out of its batch, untouched: the backend id belongs to another job, or
    the job already has another backend id."""

    pair: Pair
    owner: str | None

    @property
    def reason(self) -> str:
        if self.owner is None:
            return f"job {self.pair.job.id} already has another backend job id"
        return f"backend job id already belongs to job {self.owner}"


async def lock_backend_id(conn: asyncpg.Connection, kind: Kind, backend_job_id: str) -> None:
    """Take the transaction-scoped lock that `attach` holds for this backend id.

    The receiver's protocol for an id that `jobs.lock_for_backend_id` did not find: take
    this lock, look the id up again (an alias may have just been committed), and only then
    `record` it as an orphan. Without it, an event recorded while `attach` runs would stay
    orphaned although its alias exists.
    """
    await conn.execute(LOCK_BACKEND_ID, kind.value, backend_job_id)


async def lock_backend_ids(
    conn: asyncpg.Connection, ids: Sequence[tuple[Kind, str]]
) -> None:
    """`lock_backend_id` for many (kind, backend id), in a deadlock-free order."""
    await conn.execute(LOCK_BACKEND_IDS, [k.value for k, _ in ids], [b for _, b in ids])


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
    (result,) = await attach_many(conn, [Pair(kind, backend_job_id, job)], source=source)
    if isinstance(result, Refused):
        raise Duplicate(result.reason)
    return result


async def attach_many(
    conn: asyncpg.Connection, pairs: Sequence[Pair], *, source: str
) -> list[Attached | Refused]:
    """`attach` for a batch of pairs with a constant number of statements, in the caller's
    transaction; one result per pair, in order.

    The caller has locked every pair's job (`jobs.lock_many`: in id order). The result is
    what attaching the pairs one by one in this order would write, except that a pair
    `attach` would refuse with Duplicate is left out, untouched, and returned as Refused.
    """
    if not pairs:
        return []
    await lock_backend_ids(conn, [(p.kind, p.backend_job_id) for p in pairs])
    owners = await conn.fetch(
        INSERT_ALIASES,
        [p.kind.value for p in pairs],
        [p.backend_job_id for p in pairs],
        [p.job.id for p in pairs],
        source,
    )
    results: list[Attached | Refused | None] = [None] * len(pairs)
    # the first pair of each backend id replays its events; a repeat of it replays nothing
    replaying: dict[tuple[Kind, str], int] = {}
    for pair, row in zip(pairs, owners, strict=True):
        index = row["i"] - 1
        if row["owner"] != pair.job.id:
            results[index] = Refused(pair, row["owner"])
        else:
            replaying.setdefault((pair.kind, pair.backend_job_id), index)
    if replaying:
        await _replay(conn, pairs, replaying, results, source)
    return [r if r is not None else Attached(pairs[i].job, (), ()) for i, r in
            enumerate(results)]


async def _replay(
    conn: asyncpg.Connection,
    pairs: Sequence[Pair],
    replaying: dict[tuple[Kind, str], int],
    results: list[Attached | Refused | None],
    source: str,
) -> None:
    """Replay the pending events of the accepted pairs through `jobs.apply_many`."""
    keys = list(replaying)
    events = await conn.fetch(
        PENDING_EVENTS, [k.value for k, _ in keys], [b for _, b in keys],
        sorted({k.value for k, _ in keys}),
    )
    updates: dict[int, list[JobUpdate]] = {}
    event_ids: list[int] = []
    dedupe_keys: list[str] = []
    linked_jobs: list[str] = []
    for event in events:
        kind = Kind(event["kind"])
        index = replaying[kind, event["backend_job_id"]]
        update = decode_stored(event["payload"]).to_update(kind, source=source)
        updates.setdefault(index, []).append(update)
        event_ids.append(event["id"])
        dedupe_keys.append(event["dedupe_key"])
        linked_jobs.append(pairs[index].job.id)
    order = list(updates)
    replayed = await store_jobs.apply_many(
        conn, [(pairs[i].job, updates[i]) for i in order]
    )
    for index, done in zip(order, replayed, strict=True):
        results[index] = Attached(
            done.job,
            tuple(a.transition for a in done.applied),
            tuple(a.notification_id for a in done.applied if a.notification_id is not None),
        )
    if order:
        resolved = [pairs[i] for i in order]
        await conn.execute(
            SETTLE_REPLAYED,
            event_ids,
            dedupe_keys,
            linked_jobs,
            [p.kind.value for p in resolved],
            [p.backend_job_id for p in resolved],
            [p.job.id for p in resolved],
            _STATE_FOR_SOURCE[source],
            sorted({p.kind.value for p in resolved}),
        )
