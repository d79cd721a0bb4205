"""The delivery outbox: calls to the generator backend, written in the job's transaction.

`enqueue` runs inside the transaction that creates (or cancels) the job, so a committed job
always has its delivery recorded; the NOTIFY wakes a dispatcher on any server process for
the first attempt right after commit.
"""

from __future__ import annotations

from typing import Any

import asyncpg

WAKE_CHANNEL = "sorami_outbox"

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
