"""The rows an import of the existing app's database writes here, keyed on legacy ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind

KNOWN = """
SELECT legacy_id, target, updated_at FROM legacy_generations
WHERE kind = $1 AND legacy_id = ANY($2::text[])
"""

INSERT_JOBS = """
INSERT INTO jobs (id, kind, user_id, org_id, prompt, prompt_norm, params, status, progress,
                  message, error_message, model_name, generation_time_seconds, created_at,
                  updated_at, finished_at)
SELECT * FROM unnest($1::text[], $2::job_kind[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::jsonb[], $8::job_status[], $9::smallint[], $10::text[],
                     $11::text[], $12::text[], $13::float8[], $14::timestamptz[],
                     $15::timestamptz[], $16::timestamptz[])
ON CONFLICT (id) DO NOTHING
"""

INSERT_JOB_EVENTS = """
INSERT INTO job_events (job_id, seq, status, progress, message, source, created_at)
SELECT id, 1, status, progress, message, 'legacy_import', at
FROM unnest($1::text[], $2::job_status[], $3::smallint[], $4::text[], $5::timestamptz[])
    AS e(id, status, progress, message, at)
ON CONFLICT DO NOTHING
"""

INSERT_FILES = """
INSERT INTO job_files (job_id, position, url, storage_key, filename, format, size_bytes, width,
                       height, duration_seconds, description, created_at)
SELECT * FROM unnest($1::text[], $2::smallint[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::bigint[], $8::int[], $9::int[], $10::float8[],
                     $11::text[], $12::timestamptz[])
ON CONFLICT DO NOTHING
"""

INSERT_ORPHANS = """
INSERT INTO orphans (kind, backend_job_id, user_id, prompt, prompt_norm, file_count,
                     event_count, first_seen_at, last_seen_at)
SELECT kind, id, NULL, prompt, prompt_norm, files, 1, at, at
FROM unnest($1::job_kind[], $2::text[], $3::text[], $4::text[], $5::int[],
            $6::timestamptz[]) AS o(kind, id, prompt, prompt_norm, files, at)
ON CONFLICT DO NOTHING
"""

INSERT_ORPHAN_EVENTS = """
INSERT INTO orphan_events (kind, backend_job_id, dedupe_key, event_status, payload,
                           received_at)
SELECT kind, id, 'legacy:' || kind || ':' || id, 'completed', payload, at
FROM unnest($1::job_kind[], $2::text[], $3::jsonb[], $4::timestamptz[])
    AS e(kind, id, payload, at)
ON CONFLICT DO NOTHING
"""

RECORD_IMPORTED = """
INSERT INTO legacy_generations (kind, legacy_id, target, updated_at, author_id)
SELECT * FROM unnest($1::job_kind[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])
ON CONFLICT (kind, legacy_id) DO UPDATE SET updated_at = EXCLUDED.updated_at
"""

# A legacy notification's job is the generation it names, when that was imported as a job.
INSERT_NOTIFICATIONS = """
INSERT INTO notifications (legacy_id, user_id, job_id, type, title, message, metadata,
                           read_at, created_at)
SELECT n.legacy_id, n.user_id, j.id, n.type, n.title, n.message, n.metadata,
       CASE WHEN n.read THEN n.at END, n.at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::jsonb[], $8::bool[], $9::timestamptz[])
    AS n(legacy_id, user_id, generation_id, type, title, message, metadata, read, at)
LEFT JOIN jobs j ON j.id = n.generation_id
ON CONFLICT DO NOTHING
"""


async def known(conn: asyncpg.Connection, kind: Kind,
                ids: Sequence[str]) -> dict[str, asyncpg.Record]:
    return {r["legacy_id"]: r for r in await conn.fetch(KNOWN, kind.value, list(ids))}


def columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Row tuples -> one list per column, for `unnest`."""
    return [[r[i] for r in rows] for i in range(width)]


async def write(conn: asyncpg.Connection, statement: str, rows: Sequence[Sequence[Any]],
                width: int) -> None:
    if rows:
        await conn.execute(statement, *columns(rows, width))


NOTIFICATIONS_KNOWN = """
SELECT count(*) FROM notifications WHERE legacy_id = ANY($1::text[])
"""


async def notifications_known(conn: asyncpg.Connection, ids: Sequence[str]) -> int:
    found: int = await conn.fetchval(NOTIFICATIONS_KNOWN, list(ids))
    return found


# What became of each misattributed row: given back (to the job's user) or still open, with
# the reason of its latest decision.
REPAIRS = """
SELECT g.kind, g.legacy_id, g.author_id, o.state, j.id AS job_id, j.user_id,
       COALESCE(d.reason, d.evidence->>'reason') AS reason
FROM legacy_generations g
JOIN orphans o ON o.kind = g.kind AND o.backend_job_id = g.legacy_id
LEFT JOIN jobs j ON j.id = o.job_id
LEFT JOIN LATERAL (SELECT x.reason, x.evidence FROM reconcile_decisions x
                   WHERE x.kind = o.kind AND x.backend_job_id = o.backend_job_id
                   ORDER BY x.id DESC LIMIT 1) AS d ON true
WHERE g.target = 'orphan'
ORDER BY g.kind, g.legacy_id
"""


async def repairs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(REPAIRS)
    return rows

