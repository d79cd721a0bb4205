"""The migrations produce the schema the code expects, once, however many run at once."""

from __future__ import annotations

import asyncio
import importlib
import os
import pkgutil
import subprocess
import sys

import asyncpg
import pytest

from gateway.store.migrations import MIGRATION_LOCK_KEY, load_migrations, migrate
from gateway.store.statements import Statement

SQL_PREFIXES = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")


def sql_constants() -> list[tuple[str, str]]:
    """Every module-level statement in the gateway and the reconciler: UPPER_CASE str
    constants that start as SQL does, and composed Statements."""
    import gateway
    import reconcile

    found = []
    for package in (gateway, reconcile):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            # the legacy source's statements read the existing app's schema (their own test)
            if info.name.endswith(("__main__", "legacy_source")):
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if isinstance(value, Statement) and getattr(module, "__name__", "") == info.name:
                    found.append((f"{info.name}.{name}", value.sql))
                elif (
                    name.isupper()
                    and isinstance(value, str)
                    and value.lstrip().upper().startswith(SQL_PREFIXES)
                    and getattr(module, "__name__", "") == info.name
                ):
                    found.append((f"{info.name}.{name}", value))
    return found


async def test_migrate_on_an_empty_database_prepares_every_query(
    empty_database_url: str,
) -> None:
    applied = await migrate(empty_database_url)
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    conn = await asyncpg.connect(empty_database_url)
    try:
        queries = sql_constants()
        assert len(queries) >= 5
        for name, query in queries:
            try:
                await conn.prepare(query)
            except asyncpg.PostgresError as exc:  # pragma: no cover - the failure message
                pytest.fail(f"{name} does not fit the migrated schema: {exc}")
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert {
        "jobs", "job_events", "job_files", "notifications", "job_aliases",
        "webhook_deliveries", "orphans", "orphan_events", "outbox",
        "reconcile_runs", "reconcile_decisions", "schema_migrations",
    } <= tables


async def test_second_migrate_is_a_no_op(empty_database_url: str) -> None:
    await migrate(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        before = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
        assert await migrate(empty_database_url) == []
        after = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert before == after


async def test_three_migrate_processes_apply_each_migration_once(
    empty_database_url: str,
) -> None:
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    # hold the lock so the three processes start, queue on it, then race
    holder = await asyncpg.connect(empty_database_url)
    await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "migrate",
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for _ in range(100):
        waiting = await holder.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        if waiting == 3:
            break
        await asyncio.sleep(0.1)
    assert waiting == 3
    await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    results = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    applied_logs = sum(err.decode().count("migration_applied") for _, err in results)
    rows = await holder.fetch("SELECT version, count(*) FROM schema_migrations GROUP BY version")
    await holder.close()
    assert applied_logs == len(load_migrations())
    assert all(r["count"] == 1 for r in rows)
    assert len(rows) == len(load_migrations())


async def test_an_edited_applied_migration_is_refused(empty_database_url: str) -> None:
    await migrate(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    await conn.close()
    from gateway.store.errors import MigrationError

    with pytest.raises(MigrationError, match="forward-only"):
        await migrate(empty_database_url)
