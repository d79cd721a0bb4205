"""The delivery outbox: calls to the generator backend, written in the job's transaction.

`enqueue` runs inside the transaction that creates (or cancels) the job, so a committed job
always has its delivery recorded; the NOTIFY wakes a dispatcher on any server process for
the first attempt right after commit.

The dispatcher's side: `claim` leases due rows with `FOR UPDATE SKIP LOCKED`, so several
processes share one outbox and a crashed claimer's rows come back when its lease ends;
`mark_delivered`, `mark_failed` and `reschedule` settle or return a claim; `listen` keeps
the one LISTEN connection of a process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from gateway.jobs.kinds import Kind
from gateway.jobs.records import JobUpdate, LockedJob
from gateway.jobs.state import Status, transition
from gateway.store import jobs as store_jobs
from gateway.store import orphans
from gateway.store.database import translate_errors
from gateway.store.errors import Duplicate
from gateway.store.jobs import Applied
from gateway.store.listen import listen as listen_channel
from gateway.store.orphans import Attached
from gateway.store.statements import Statement
from gateway.store.statuses import TERMINAL_LIST

log = structlog.get_logger(__name__)

WAKE_CHANNEL = "sorami_outbox"
LISTENER_APPLICATION_NAME = "sorami-outbox"

ENQUEUE = """
WITH row AS (
    INSERT INTO outbox (job_id, action, payload)
    VALUES ($1, $2, $3)
    ON CONFLICT ON CONSTRAINT outbox_once DO NOTHING
    RETURNING id
)
SELECT id, pg_notify('sorami_outbox', id::text) FROM row
"""


async def enqueue(
    conn: asyncpg.Connection, job_id: str, action: str, payload: dict[str, Any]
) -> int | None:
    """Record one call to make; None when that job already has this action queued."""
    outbox_id: int | None = await conn.fetchval(ENQUEUE, job_id, action, payload)
    return outbox_id


# -- the dispatcher's side --------------------------------------------------------------------
#
# A row is settled once `delivered_at` (the backend accepted it) or `failed_at` (refused,
# retries exhausted, or not sent at all: `last_error` says which) is set. Until then it is
# claimed by one dispatcher at a time through a lease: `lease_owner` names the claimer and
# `attempts` (bumped by every claim) tells one claim of the row from the next.

# The dispatcher's own bookkeeping (a lease taken, a row given back for later, an accepted
# call recorded) need not wait for its WAL flush: a crash that forgets it leaves the row to
# be sent again under the same Idempotency-Key, which the backend answers as the first
# time. Not waiting matters because every commit that NOTIFYs holds one lock through its
# flush: the job creations' commits, which must be durable, would queue behind these. A
# common table expression of the statement sets it for the statement's own transaction.
_ASYNC_COMMIT = "async_commit AS (SELECT set_config('synchronous_commit', 'off', true))"

_PENDING = """o.delivered_at IS NULL AND o.failed_at IS NULL
      AND (o.leased_until IS NULL OR o.leased_until <= now())"""

# Due rows nobody holds a live lease on. A cancel waits until its job's generate row is
# settled, so the two never reach the backend at once and the cancel names the right id; a
# generate row whose job already ended is due at once (it is settled without a call).
# Two reads, each stopping after $3 rows: the due rows in due order straight from the
# outbox_due_order index, and the few rows still waiting for a retry whose job has ended (read
# first: they cost no call). One read with the job's status in its condition had to join
# and sort every pending row on each claim: 9 ms with 10,000 waiting, on every commit that
# wakes the dispatchers, which made a burst of creations the database's busiest work.
CLAIM = f"""
WITH {_ASYNC_COMMIT}, ended AS (
    SELECT o.id
    FROM outbox o
    JOIN jobs j ON j.id = o.job_id
    WHERE {_PENDING}
      AND o.due_at > now() AND o.action = 'generate' AND j.status IN {TERMINAL_LIST}
    LIMIT $3
    FOR UPDATE OF o SKIP LOCKED
), due_now AS (
    SELECT o.id
    FROM outbox o
    WHERE {_PENDING}
      AND o.due_at <= now()
      AND NOT (o.action = 'cancel' AND EXISTS (
            SELECT 1 FROM outbox g
            WHERE g.job_id = o.job_id AND g.action = 'generate'
              AND g.delivered_at IS NULL AND g.failed_at IS NULL))
    ORDER BY o.due_at, o.id
    LIMIT $3
    FOR UPDATE OF o SKIP LOCKED
), due AS (
    SELECT id FROM ended
    UNION ALL
    SELECT id FROM due_now
    LIMIT $3
)
UPDATE outbox o
SET leased_until = now() + make_interval(secs => $2),
    lease_owner = $1,
    attempts = o.attempts + 1
FROM due, jobs j, async_commit
WHERE o.id = due.id AND j.id = o.job_id
RETURNING o.id, o.job_id, o.action, o.payload, o.attempts, j.kind, j.status, j.user_id,
          j.progress, j.seq, j.created_at, j.first_webhook_at,
          (SELECT a.backend_job_id FROM job_aliases a WHERE a.job_id = o.job_id)
              AS backend_job_id
"""

# Seconds until the next row may become claimable (its due time or the end of its lease);
# NULL when nothing is waiting. Blocked cancels are left out: they wake with their generate;
# so are calls waiting for admission (due 'infinity'): an admission makes them due.
NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM min(GREATEST(o.due_at, COALESCE(o.leased_until, o.due_at))) - now())
FROM outbox o
WHERE o.delivered_at IS NULL AND o.failed_at IS NULL AND o.due_at <> 'infinity'
  AND NOT (o.action = 'cancel' AND EXISTS (
        SELECT 1 FROM outbox g
        WHERE g.job_id = o.job_id AND g.action = 'generate'
          AND g.delivered_at IS NULL AND g.failed_at IS NULL))
"""

# Whoever holds the row, an accepted call settles it: the backend has the job either way.
# The payload goes (it may hold a 10 MiB input image).
_SET_DELIVERED = """SET delivered_at = now(), payload = NULL, leased_until = NULL,
    lease_owner = NULL, last_error = NULL"""

MARK_DELIVERED = f"""
UPDATE outbox
{_SET_DELIVERED}
WHERE id = $1 AND delivered_at IS NULL AND failed_at IS NULL
RETURNING id
"""

# An accepted generate, recorded in one statement when the job is still at the seq its claim
# read: the job's row locked (first, as everywhere), the row settled, and the job's event
# (QUEUED) applied only when this settled it.
DELIVERED_AND_APPLY = Statement.compose(
    "DELIVERED_AND_APPLY",
    "An accepted generate: lock the job when it is still at the seq its claim read\n"
    "(claimed_seq), settle the outbox row, and apply the job's event (APPLY) only when this\n"
    "settled it. Returns whether the job was locked and the row settled, and the new seq.",
    store_jobs.guarded(
        False,
        f"""
{_ASYNC_COMMIT}, job AS (
    SELECT id FROM jobs, async_commit
    WHERE id = $job_id AND seq = $claimed_seq
    FOR UPDATE OF jobs
), settled AS (
    UPDATE outbox
    {_SET_DELIVERED}
    WHERE id = $outbox_id AND delivered_at IS NULL
      AND failed_at IS NULL AND EXISTS (SELECT 1 FROM job)
    RETURNING id
), flags AS (
    SELECT EXISTS (SELECT 1 FROM job) AS locked, EXISTS (SELECT 1 FROM settled) AS settled
)""",
        guard="(SELECT settled FROM flags)",
        columns="(SELECT locked FROM flags) AS locked, (SELECT settled FROM flags) AS settled, ",
    ),
    (*store_jobs.APPLY_PARAMS, "claimed_seq", "outbox_id"),
)

# Only the current claim may fail or reschedule its row.
MARK_FAILED = """
UPDATE outbox
SET failed_at = now(), payload = NULL, leased_until = NULL, lease_owner = NULL,
    last_error = $4
WHERE id = $1 AND lease_owner = $2 AND attempts = $3
  AND delivered_at IS NULL AND failed_at IS NULL
RETURNING id
"""

RESCHEDULE = f"""
WITH {_ASYNC_COMMIT}
UPDATE outbox
SET due_at = now() + make_interval(secs => $4), leased_until = NULL, lease_owner = NULL,
    last_error = $5
FROM async_commit
WHERE id = $1 AND lease_owner = $2 AND attempts = $3
  AND delivered_at IS NULL AND failed_at IS NULL
RETURNING id
"""

# A job's cancel that has nothing to cancel: the backend never received the job.
SETTLE_UNSENT_CANCEL = """
UPDATE outbox
SET failed_at = now(), payload = NULL, leased_until = NULL, lease_owner = NULL,
    last_error = $2
WHERE job_id = $1 AND action = 'cancel' AND delivered_at IS NULL AND failed_at IS NULL
RETURNING id
"""

# Claims given back before any call was made: they do not count as attempts.
RELEASE = """
UPDATE outbox
SET leased_until = NULL, lease_owner = NULL, attempts = GREATEST(attempts - 1, 0)
WHERE id = ANY($1::bigint[]) AND lease_owner = $2
  AND delivered_at IS NULL AND failed_at IS NULL
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    """One claimed row, with what sending it needs to know about its job."""

    id: int
    action: str
    payload: Any
    # this claim's number: 1 for the first attempt
    attempts: int
    # the backend's own id for the job, when its answer (or the reconciler) recorded one
    backend_job_id: str | None
    # the job as the claim read it (not locked: it may have moved on since)
    job: LockedJob

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def kind(self) -> Kind:
        return self.job.kind

    @property
    def job_status(self) -> Status:
        return self.job.state.status

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Claimed:
        return cls(
            id=r["id"],
            action=r["action"],
            payload=r["payload"],
            attempts=r["attempts"],
            backend_job_id=r["backend_job_id"],
            job=store_jobs.locked_job(r, id_column="job_id"),
        )


async def claim(
    conn: asyncpg.Connection, *, owner: str, lease_seconds: float, limit: int
) -> list[Claimed]:
    """Lease up to `limit` due rows to `owner` for `lease_seconds`, oldest due first."""
    rows = await conn.fetch(CLAIM, owner, lease_seconds, limit)
    return [Claimed.from_record(r) for r in rows]


async def next_due_in(conn: asyncpg.Connection) -> float | None:
    """Seconds until a row may be claimable (<= 0: now); None when the outbox is idle."""
    seconds = await conn.fetchval(NEXT_DUE)
    return None if seconds is None else float(seconds)


async def mark_delivered(conn: asyncpg.Connection, outbox_id: int) -> bool:
    """Settle a row the backend accepted; False when it was settled already."""
    return await conn.fetchval(MARK_DELIVERED, outbox_id) is not None


async def delivered_and_apply(
    conn: asyncpg.Connection, row: Claimed, update: JobUpdate
) -> Applied | bool | None:
    """Settle an accepted generate and apply `update` to its job in one statement, when the
    job is where the claim read it and `update` moves it: the Applied; False when the row
    was settled already (nothing written); None when the job moved on since the claim or the
    update would not apply (nothing written: lock the job and decide again)."""
    step = transition(row.job.state, update.event)
    if not step.applied or step.finished:
        return None
    values = store_jobs.apply_values(row.job, update, step)
    values.update(claimed_seq=row.job.seq, outbox_id=row.id)
    done = await conn.fetchrow(DELIVERED_AND_APPLY.sql, *DELIVERED_AND_APPLY.args(values))
    assert done is not None
    if not done["locked"]:
        return None
    if not done["settled"]:
        return False
    return Applied(step, done["seq"])


async def mark_failed(conn: asyncpg.Connection, row: Claimed, *, owner: str, error: str) -> bool:
    """Settle a row for good with the reason; False when this claim no longer holds it."""
    return await conn.fetchval(MARK_FAILED, row.id, owner, row.attempts, error) is not None


async def reschedule(
    conn: asyncpg.Connection, row: Claimed, *, owner: str, delay_seconds: float, error: str
) -> bool:
    """Give the row back, due again in `delay_seconds`; False when this claim lost it."""
    found = await conn.fetchval(RESCHEDULE, row.id, owner, row.attempts, delay_seconds, error)
    return found is not None


async def settle_unsent_cancel(conn: asyncpg.Connection, job_id: str, reason: str) -> bool:
    """Settle the job's pending cancel without a call; False when there is none."""
    return await conn.fetchval(SETTLE_UNSENT_CANCEL, job_id, reason) is not None


async def release(conn: asyncpg.Connection, outbox_ids: list[int], *, owner: str) -> None:
    """Hand back rows claimed but never sent, claimable again at once."""
    await conn.execute(RELEASE, outbox_ids, owner)


async def record_backend_id(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str, job: LockedJob
) -> Attached | None:
    """`orphans.attach` from delivery, in a savepoint: None when that id is taken already.

    A backend id that already belongs to another job (or a job that already has another
    alias) must not undo the delivery being recorded around it.
    """
    try:
        async with conn.transaction():
            with translate_errors():
                return await orphans.attach(conn, kind, backend_job_id, job, source="delivery")
    except Duplicate:
        return None


async def wake(conn: asyncpg.Connection) -> None:
    """Wake every replica's dispatcher (a job ended elsewhere: an admission slot is free)."""
    await conn.execute(f"SELECT pg_notify('{WAKE_CHANNEL}', '')")


async def listen(dsn: str, on_wake: Callable[[], None], *, stopping: asyncio.Event) -> None:
    """LISTEN on the wake channel until `stopping` is set; `on_wake` is called for every
    NOTIFY and after every (re)connection, since NOTIFYs sent while it was down are lost."""
    await listen_channel(
        dsn,
        WAKE_CHANNEL,
        lambda _payload: on_wake(),
        application_name=LISTENER_APPLICATION_NAME,
        on_listening=on_wake,
        stopping=stopping,
    )
