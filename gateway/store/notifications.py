"""A user's notifications: listing newest first, and marking one read.

Notifications are created by `store.jobs.apply` on a job's terminal transition; this module
only reads them for their owner and marks them read. Every query filters on the owner, so
another user's notification is exactly as absent as one that does not exist.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import asyncpg


@dataclasses.dataclass(frozen=True, slots=True)
class NotificationRow:
    id: int
    job_id: str | None
    type: str
    title: str
    message: str
    metadata: dict[str, Any]
    read_at: dt.datetime | None
    created_at: dt.datetime

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> NotificationRow:
        return cls(
            id=r["id"],
            job_id=r["job_id"],
            type=r["type"],
            title=r["title"],
            message=r["message"],
            metadata=r["metadata"],
            read_at=r["read_at"],
            created_at=r["created_at"],
        )


_COLUMNS = "n.id, n.job_id, n.type, n.title, n.message, n.metadata, n.read_at, n.created_at"

# Keyset on the identity column: ids only grow, so new rows never shift a page.
LIST_PAGE = f"""
SELECT {_COLUMNS} FROM notifications n
WHERE n.user_id = $1 AND n.id < $2
ORDER BY n.id DESC
LIMIT $3
"""

# A separate statement so the planner can use the partial index notifications_unread.
LIST_UNREAD_PAGE = f"""
SELECT {_COLUMNS} FROM notifications n
WHERE n.user_id = $1 AND n.id < $2 AND n.read_at IS NULL
ORDER BY n.id DESC
LIMIT $3
"""

COUNT_UNREAD = """
SELECT count(*) FROM notifications WHERE user_id = $1 AND read_at IS NULL
"""

# Idempotent: the first call sets read_at, later calls return the row unchanged.
MARK_READ = f"""
WITH marked AS (
    UPDATE notifications n SET read_at = now()
    WHERE n.id = $1 AND n.user_id = $2 AND n.read_at IS NULL
    RETURNING {_COLUMNS}
)
SELECT * FROM marked
UNION ALL
SELECT {_COLUMNS} FROM notifications n
WHERE n.id = $1 AND n.user_id = $2 AND NOT EXISTS (SELECT 1 FROM marked)
"""

_NO_CURSOR = 2**63 - 1


async def page(
    conn: asyncpg.Connection,
    user_id: str,
    *,
    limit: int,
    before_id: int | None = None,
    unread_only: bool = False,
) -> list[NotificationRow]:
    """Up to `limit` notifications of `user_id` with an id below `before_id`, newest first."""
    query = LIST_UNREAD_PAGE if unread_only else LIST_PAGE
    rows = await conn.fetch(query, user_id, before_id or _NO_CURSOR, limit)
    return [NotificationRow.from_record(r) for r in rows]


async def count_unread(conn: asyncpg.Connection, user_id: str) -> int:
    count: int = await conn.fetchval(COUNT_UNREAD, user_id)
    return count


async def mark_read(
    conn: asyncpg.Connection, notification_id: int, user_id: str
) -> NotificationRow | None:
    """Mark one of `user_id`'s notifications read; None when they have no such notification."""
    row = await conn.fetchrow(MARK_READ, notification_id, user_id)
    return NotificationRow.from_record(row) if row else None
