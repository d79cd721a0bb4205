"""Per-user limits in PostgreSQL: the operators' overrides with their record of changes.

A create applies them (under its lock per user and kind, with the counts) in
sorami_create_job_v1; see store.owned_jobs.create."""

from __future__ import annotations

import dataclasses
import datetime as dt

import asyncpg

from gateway.jobs.limits import Override

_OVERRIDE_COLUMNS = "active_images, active_videos, images_per_hour, videos_per_hour"


def _override(row: asyncpg.Record) -> Override | None:
    values = [row[c] for c in ("active_images", "active_videos", "images_per_hour",
                               "videos_per_hour")]
    return None if all(v is None for v in values) else Override(*values)


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
