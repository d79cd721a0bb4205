"""Per-user limits in PostgreSQL: the create's lock per user and kind, the counts it is
checked against, and the operators' overrides with their record of changes."""

from __future__ import annotations

import dataclasses
import datetime as dt

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.limits import WINDOW, Override, Usage
from gateway.store.statuses import TERMINAL_LIST

# the first key of the two-key advisory locks that serialise one user's creates of one kind
# (the two-key space never meets the one-key locks of orphans and migrations)
CREATE_LOCK_SPACE = 0x534C  # "SL"

_OVERRIDE_COLUMNS = "active_images, active_videos, images_per_hour, videos_per_hour"

# Held to the end of the create's transaction: the counts read after it include every
# create of this user and kind that committed before, on any replica.
LOCK_AND_READ_OVERRIDE = f"""
SELECT pg_advisory_xact_lock({CREATE_LOCK_SPACE}, hashtext($1 || ':' || $2)),
       o.*
FROM (SELECT 1) one
LEFT JOIN (SELECT {_OVERRIDE_COLUMNS} FROM user_limits WHERE user_id = $1) o ON true
"""

# $3: the hourly limit in force (0: off). frees_at is the creation whose leaving the window
# makes room for one more: the ($3)-th newest.
USAGE = f"""
WITH window_jobs AS (
    SELECT created_at FROM jobs
    WHERE user_id = $1 AND kind = $2 AND created_at > statement_timestamp() - $4::interval
)
SELECT
    (SELECT count(*) FROM jobs
     WHERE user_id = $1 AND kind = $2 AND status NOT IN {TERMINAL_LIST}) AS active,
    (SELECT count(*) FROM window_jobs) AS in_window,
    (SELECT min(created_at) FROM window_jobs) + $4::interval AS oldest_leaves_at,
    (SELECT created_at FROM window_jobs ORDER BY created_at DESC OFFSET greatest($3 - 1, 0)
     LIMIT 1) + $4::interval AS frees_at,
    statement_timestamp() AS now
"""


def _override(row: asyncpg.Record) -> Override | None:
    values = [row[c] for c in ("active_images", "active_videos", "images_per_hour",
                               "videos_per_hour")]
    return None if all(v is None for v in values) else Override(*values)


async def lock_and_read_override(
    conn: asyncpg.Connection, user_id: str, kind: Kind
) -> Override | None:
    """Take the user's create lock for `kind` (to the end of the transaction) and read
    their override, if any."""
    row = await conn.fetchrow(LOCK_AND_READ_OVERRIDE, user_id, kind.value)
    assert row is not None
    return _override(row)


async def usage(
    conn: asyncpg.Connection, user_id: str, kind: Kind, per_hour: int
) -> tuple[Usage, dt.datetime]:
    """The user's jobs of `kind` against an hourly limit of `per_hour`, and the time read."""
    row = await conn.fetchrow(USAGE, user_id, kind.value, per_hour, WINDOW)
    assert row is not None
    frees_at = row["frees_at"] if per_hour and row["in_window"] >= per_hour else None
    return Usage(row["active"], row["in_window"], row["oldest_leaves_at"], frees_at), row["now"]


READ_OVERRIDE = f"SELECT {_OVERRIDE_COLUMNS} FROM user_limits WHERE user_id = $1"


async def read_override(conn: asyncpg.Connection, user_id: str) -> Override | None:
    """The user's override, if any, without the create lock."""
    row = await conn.fetchrow(READ_OVERRIDE, user_id)
    return _override(row) if row else None


@dataclasses.dataclass(frozen=True, slots=True)
class StoredOverride:
    user_id: str
    override: Override
    set_by: str
    set_at: dt.datetime


GET_OVERRIDE = f"""
SELECT user_id, {_OVERRIDE_COLUMNS}, set_by, set_at FROM user_limits WHERE user_id = $1
"""

# NULLs in the change keep what was set before; one statement records the change too
SET_OVERRIDE = f"""
WITH saved AS (
    INSERT INTO user_limits (user_id, {_OVERRIDE_COLUMNS}, set_by)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (user_id) DO UPDATE SET
        active_images = coalesce(EXCLUDED.active_images, user_limits.active_images),
        active_videos = coalesce(EXCLUDED.active_videos, user_limits.active_videos),
        images_per_hour = coalesce(EXCLUDED.images_per_hour, user_limits.images_per_hour),
        videos_per_hour = coalesce(EXCLUDED.videos_per_hour, user_limits.videos_per_hour),
        set_by = EXCLUDED.set_by,
        set_at = now()
    RETURNING user_id, {_OVERRIDE_COLUMNS}, set_by, set_at
), recorded AS (
    INSERT INTO user_limit_changes (user_id, action, limits, changed_by)
    SELECT user_id, 'set',
           jsonb_build_object('active_images', active_images, 'active_videos', active_videos,
                              'images_per_hour', images_per_hour,
                              'videos_per_hour', videos_per_hour),
           set_by
    FROM saved
)
SELECT * FROM saved
"""

RESET_OVERRIDE = """
WITH removed AS (
    DELETE FROM user_limits WHERE user_id = $1 RETURNING user_id
)
INSERT INTO user_limit_changes (user_id, action, limits, changed_by)
SELECT user_id, 'reset', NULL, $2 FROM removed
"""


def _stored(row: asyncpg.Record) -> StoredOverride:
    override = _override(row) or Override()
    return StoredOverride(row["user_id"], override, row["set_by"], row["set_at"])


async def get_override(conn: asyncpg.Connection, user_id: str) -> StoredOverride | None:
    row = await conn.fetchrow(GET_OVERRIDE, user_id)
    return _stored(row) if row else None


async def set_override(
    conn: asyncpg.Connection, user_id: str, changes: Override, set_by: str
) -> StoredOverride:
    """Set the given limits of the user's override (the others stay), recording who did."""
    row = await conn.fetchrow(
        SET_OVERRIDE, user_id, *dataclasses.astuple(changes), set_by
    )
    assert row is not None
    return _stored(row)


async def reset_override(conn: asyncpg.Connection, user_id: str, reset_by: str) -> bool:
    """Remove the user's override (the defaults apply again); False when there was none."""
    status: str = await conn.execute(RESET_OVERRIDE, user_id, reset_by)
    return status.endswith(" 1")
