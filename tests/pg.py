"""A real PostgreSQL for the tests: an external server when one answers, else the embedded one.

A template database is migrated from sql/ once per session; each test gets a fresh database
cloned from it with CREATE DATABASE ... TEMPLATE (procrastinate's approach).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.store.migrations import migrate


def with_database(dsn: str, name: str) -> str:
    """The same server, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


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
def admin_dsn(scratch: Path) -> Iterator[str]:
    """A DSN with the right to create databases, for the whole session."""
    dsn = external_dsn()
    if dsn is not None:
        yield dsn
        return
    from gateway.embedded import embedded_postgres

    with embedded_postgres(scratch) as embedded:
        yield embedded


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
        name = urlsplit(dsn).path.lstrip("/")
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def drop_template(self) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')
