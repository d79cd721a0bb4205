"""Forward-only migrations from sql/migrations, applied under an advisory lock.

Each file `NNNN_name.sql` runs in its own transaction together with its record in
`schema_migrations`; the session-level advisory lock makes concurrent `migrate` calls
(several replicas starting at once) apply each migration exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from functools import cache
from pathlib import Path

import asyncpg
import structlog

from gateway.store.database import connect, translate_errors
from gateway.store.errors import MigrationError

log = structlog.get_logger(__name__)

# pg_advisory_lock key: "sorami-m" as a 64-bit integer, shared by every replica
MIGRATION_LOCK_KEY = int.from_bytes(b"sorami-m", "big") & 0x7FFF_FFFF_FFFF_FFFF

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_dir() -> Path:
    """sql/ beside the packages in a checkout; gateway/_sql inside an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_sql", here.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise MigrationError(f"no sql/migrations directory near {here}")


@cache
def load_migrations(directory: Path | None = None) -> tuple[Migration, ...]:
    directory = directory or sql_dir() / "migrations"
    found = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"migration file name must be NNNN_name.sql: {path.name}")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migrations share a version number")
    return tuple(found)


def latest_version() -> int:
    migrations = load_migrations()
    return migrations[-1].version if migrations else 0


async def applied_versions(conn: asyncpg.Connection) -> dict[int, str]:
    """version -> checksum of what the database has; empty when never migrated."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


async def is_current(conn: asyncpg.Connection) -> bool:
    """True when every migration in sql/ is applied (the readiness check)."""
    applied = await applied_versions(conn)
    return all(m.version in applied for m in load_migrations())


async def migrate(dsn: str) -> list[Migration]:
    """Apply the pending migrations in order; return the ones this call applied."""
    conn = await connect(dsn)
    try:
        with translate_errors():
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            try:
                return await _apply_pending(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection) -> list[Migration]:
    await conn.execute(CREATE_TABLE)
    applied = await applied_versions(conn)
    done: list[Migration] = []
    for migration in load_migrations():
        recorded = applied.get(migration.version)
        if recorded is not None:
            if recorded != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} was changed after "
                    "it was applied; migrations are forward-only, add a new one"
                )
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        log.info("migration_applied", version=migration.version, name=migration.name)
        done.append(migration)
    return done
