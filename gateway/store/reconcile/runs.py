"""The reconciler's runs: one at a time (a session advisory lock), each recorded with its
counts, and its plan cleared when it ends."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from typing import Any

import asyncpg

# pg_try_advisory_lock key: "sorami-r" as a 64-bit integer, held for a whole run
RUN_LOCK_KEY = int.from_bytes(b"sorami-r", "big") & 0x7FFF_FFFF_FFFF_FFFF

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
