"""Admission toward the backend: generate calls of a kind with an in-flight cap wait (due
'infinity') until a dispatcher admits them, under a lock per kind held by PostgreSQL, so
the cap holds across every replica; round-robin between users, oldest first in each round.
A backend 429 pauses admissions of its kind."""

from __future__ import annotations

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.store.statuses import TERMINAL_LIST

# the first key of the two-key advisory lock of one kind's admissions (store.limits uses
# another first key for the creates' locks)
ADMISSION_LOCK_SPACE = 0x5341  # "SA"

LOCK = f"SELECT pg_advisory_xact_lock({ADMISSION_LOCK_SPACE}, hashtext($1))"

# An outbox row `o` waiting for admission: the partial index outbox_waiting's predicate.
WAITING = "o.due_at = 'infinity' AND o.delivered_at IS NULL AND o.failed_at IS NULL"

PAUSED = """
SELECT EXISTS (SELECT 1 FROM backend_pauses WHERE kind = $1 AND paused_until > now())
"""

# Handed over (admitted) and not terminal: a slot is freed by the job's end, whatever ends it.
_IN_FLIGHT_JOBS = f"""
FROM jobs j JOIN outbox o ON o.job_id = j.id AND o.action = 'generate'
WHERE j.kind = $1 AND j.status NOT IN {TERMINAL_LIST}
  AND o.due_at <> 'infinity' AND o.failed_at IS NULL"""

IN_FLIGHT = f"SELECT count(*) {_IN_FLIGHT_JOBS}"

# Round-robin between users: a user's waiting calls take turns numbered after the jobs the
# user already has in flight, and the lowest turns go first (oldest first within a turn), so
# one user's burst never holds back another user's one job.
ADMIT = f"""
WITH flying AS (
    SELECT j.user_id, count(*) AS n {_IN_FLIGHT_JOBS}
    GROUP BY j.user_id
), waiting AS (
    SELECT o.id, o.created_at,
           coalesce(f.n, 0)
           + row_number() OVER (PARTITION BY j.user_id ORDER BY o.created_at, o.id) AS turn
    FROM outbox o JOIN jobs j ON j.id = o.job_id
    LEFT JOIN flying f ON f.user_id = j.user_id
    WHERE {WAITING}
      AND o.action = 'generate' AND j.kind = $1
), chosen AS (
    SELECT id FROM waiting ORDER BY turn, created_at, id LIMIT $2
)
UPDATE outbox o SET due_at = now()
FROM chosen WHERE o.id = chosen.id
RETURNING o.id
"""

PAUSE = """
INSERT INTO backend_pauses (kind, paused_until)
VALUES ($1, now() + make_interval(secs => $2))
ON CONFLICT (kind) DO UPDATE
SET paused_until = GREATEST(backend_pauses.paused_until, EXCLUDED.paused_until)
"""


async def admit(conn: asyncpg.Connection, kind: Kind, cap: int) -> int:
    """Make due as many waiting generate calls of `kind` as the cap leaves room for (all of
    them when `cap` is 0), unless admissions of `kind` are paused; how many."""
    async with conn.transaction():
        await conn.execute(LOCK, kind.value)
        if await conn.fetchval(PAUSED, kind.value):
            return 0
        room = cap - await conn.fetchval(IN_FLIGHT, kind.value) if cap else 2**31 - 1
        if room <= 0:
            return 0
        return len(await conn.fetch(ADMIT, kind.value, room))


async def pause(conn: asyncpg.Connection, kind: Kind, seconds: float) -> None:
    """No admission of `kind` for `seconds` (a longer pause already set stays)."""
    await conn.execute(PAUSE, kind.value, seconds)
