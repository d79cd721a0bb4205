"""The existing app's Prisma database as a source of an import.

The source is read in one REPEATABLE READ READ ONLY transaction through server-side
cursors, in batches: memory is bounded by the batch, not by the database. Nothing here
writes to the source.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.legacy import BACKEND_DIRECT, TABLES
from gateway.store.database import init_connection

# The columns an import reads, per table: a source without one of them is not the schema.
REQUIRED: Final = {
    "users": ("id", "clerkId", "createdAt"),
    "image_generations": ("id", "prompt", "inputImageUrl", "numImages", "size", "format",
                          "style", "quality", "model", "authorId", "organizationId", "status",
                          "progress", "message", "errorMessage", "processingTime",
                          "createdAt", "updatedAt", "completedAt"),
    "image_files": ("id", "generationId", "filename", "s3Key", "fileUrl", "fileSize",
                    "format", "width", "height", "aspectRatio", "metadata", "createdAt"),
    "video_generations": ("id", "prompt", "inputImageUrl", "aspectRatio", "durationSeconds",
                          "numberOfVideos", "personGeneration", "model", "authorId",
                          "organizationId", "status", "progress", "message", "errorMessage",
                          "processingTime", "createdAt", "updatedAt", "completedAt"),
    "video_files": ("id", "generationId", "filename", "s3Key", "fileUrl", "fileSize", "format",
                    "width", "height", "durationSeconds", "aspectRatio", "metadata",
                    "createdAt"),
    "notifications": ("id", "userId", "type", "title", "message", "metadata", "read",
                      "createdAt"),
}

SOURCE_COLUMNS = """
SELECT table_name, column_name FROM information_schema.columns
WHERE table_schema = current_schema()
"""

FIRST_USER = """
SELECT id FROM users ORDER BY "createdAt", id LIMIT 1
"""

BACKEND_DIRECT_IDS = """
SELECT metadata->>'generationId' AS id FROM notifications
WHERE metadata->>'source' = $1 AND metadata->>'generationId' IS NOT NULL
"""

# Prisma stores UTC in `timestamp without time zone`: read as timestamptz in UTC.
_UTC = """ AT TIME ZONE 'UTC'"""


def generations_query(kind: Kind) -> str:
    table = TABLES[kind][0]
    columns = [c for c in REQUIRED[table] if c not in ("status", "createdAt", "updatedAt",
                                                        "completedAt")]
    listed = ", ".join(f'g."{c}"' for c in columns)
    return f"""
SELECT {listed}, g.status::text AS status, u."clerkId" AS "clerkId",
       g."createdAt"{_UTC} AS "createdAt", g."updatedAt"{_UTC} AS "updatedAt",
       g."completedAt"{_UTC} AS "completedAt"
FROM {table} g LEFT JOIN users u ON u.id = g."authorId"
ORDER BY g.id
"""


def files_query(kind: Kind) -> str:
    table = TABLES[kind][1]
    listed = ", ".join(f'f."{c}"' for c in REQUIRED[table] if c != "createdAt")
    return f"""
SELECT {listed}, f."createdAt"{_UTC} AS "createdAt"
FROM {table} f WHERE f."generationId" = ANY($1::text[])
ORDER BY f."generationId", f."createdAt", f.id
"""


NOTIFICATIONS_QUERY = f"""
SELECT n.id, n."userId", u."clerkId" AS "clerkId", n.type::text AS type, n.title, n.message,
       n.metadata, n.read, n."createdAt"{_UTC} AS "createdAt"
FROM notifications n LEFT JOIN users u ON u.id = n."userId"
ORDER BY n.id
"""


async def missing_columns(conn: asyncpg.Connection) -> list[str]:
    """`table.column` for every column an import needs that the source lacks."""
    have = {(r["table_name"], r["column_name"]) for r in await conn.fetch(SOURCE_COLUMNS)}
    return [f"{t}.{c}" for t, cs in REQUIRED.items() for c in cs if (t, c) not in have]


async def open_source(url: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(url, timeout=10)
    await init_connection(conn)
    return conn


async def batches(conn: asyncpg.Connection, query: str,
                  size: int) -> AsyncIterator[list[asyncpg.Record]]:
    """The query's rows in batches of `size`, through a server-side cursor (the caller's
    transaction)."""
    cursor = await conn.cursor(query)
    while rows := await cursor.fetch(size):
        yield rows


async def files_of(conn: asyncpg.Connection, kind: Kind,
                   ids: Sequence[str]) -> dict[str, list[asyncpg.Record]]:
    by_generation: dict[str, list[asyncpg.Record]] = {}
    for r in await conn.fetch(files_query(kind), list(ids)):
        by_generation.setdefault(r["generationId"], []).append(r)
    return by_generation


async def first_user(conn: asyncpg.Connection) -> str | None:
    value: str | None = await conn.fetchval(FIRST_USER)
    return value


async def backend_direct_ids(conn: asyncpg.Connection) -> set[str]:
    return {r["id"] for r in await conn.fetch(BACKEND_DIRECT_IDS, BACKEND_DIRECT)}


# The existing app's DDL, for building a legacy database in tests and benchmarks: shared/
# beside the repository unless SORAMI_SHARED_DIR says where.
SHARED_DIR_VARIABLE: Final = "SORAMI_SHARED_DIR"


def init_sql() -> str:
    root = Path(__file__).resolve().parents[2]
    shared = Path(os.environ.get(SHARED_DIR_VARIABLE) or root.parent / "shared")
    path = shared / "legacy" / "init.sql"
    if not path.is_file():
        raise FileNotFoundError(
            f"the existing app's schema is not at {path}: put shared/ beside the repository "
            f"or set {SHARED_DIR_VARIABLE} to its directory")
    return path.read_text()
