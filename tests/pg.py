"""A real PostgreSQL for the tests: an external server when one answers, else the embedded one.

A template database is migrated from sql/ once per session; each test gets a fresh database
cloned from it with CREATE DATABASE ... TEMPLATE (procrastinate's approach).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg

from gateway.store.dsn import database_name, with_database
from gateway.store.migrations import migrate

__all__ = ["Databases", "admin_dsn", "database_name", "refusing_connections", "with_database"]


async def _answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def external_dsn() -> str | None:
    """TEST_DATABASE_URL or DATABASE_URL, when it answers."""
    for name in ("TEST_DATABASE_URL", "DATABASE_URL"):
        dsn = os.environ.get(name)
        if dsn and asyncio.run(_answers(dsn)):
            return dsn
    return None


@contextlib.contextmanager
def admin_dsn() -> Iterator[str]:
    """A DSN with the right to create databases, for the whole session."""
    dsn = external_dsn()
    if dsn is not None:
        yield dsn
        return
    from gateway.embedded import embedded_postgres

    # not under pytest's basetemp: another pytest session of the same user prunes old
    # basetemps, and with them the data directory of a server still running here
    with tempfile.TemporaryDirectory(prefix="sorami-test-pg-") as scratch, \
            embedded_postgres(Path(scratch)) as embedded:
        yield embedded


@contextlib.asynccontextmanager
async def refusing_connections(dsn: str) -> AsyncIterator[None]:
    """Inside the block the database of `dsn` refuses new connections and has lost its open
    ones, as when it goes down; after it, it takes connections again."""
    name = database_name(dsn)
    admin = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


class Databases:
    """Creates the session's template and clones it per test."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.template = f"sorami_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create_template(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.template}"')
        await migrate(with_database(self.admin, self.template))

    async def create_empty(self) -> str:
        name = f"sorami_t_{uuid.uuid4().hex[:12]}"
        await self._admin(f'CREATE DATABASE "{name}"')
        return with_database(self.admin, name)

    async def clone(self) -> str:
        name = f"sorami_t_{uuid.uuid4().hex[:12]}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return with_database(self.admin, name)

    async def drop(self, dsn: str) -> None:
        name = database_name(dsn)
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def drop_template(self) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')
