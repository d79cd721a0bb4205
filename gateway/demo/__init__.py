"""`sorami-gateway demo`: the whole flow on the embedded default, against the simulated backend.

It starts the embedded PostgreSQL (a fresh `sorami_demo` database beside the user's data),
the gateway and the simulated backend on free local ports, makes tokens for three users and
submits a mix of image and video jobs covering every backend behaviour, among them two users
sending the same prompt at the same moment. It shows live progress, runs one reconcile pass,
prints how each job was resolved and checks the invariants the gateway promises. It exits 0
only when every invariant held.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from rich.console import Console

from gateway.demo.console import Demo
from gateway.demo.scenario import DEMO_DATABASE
from gateway.embedded import embedded_postgres
from gateway.store.dsn import with_database
from gateway.store.migrations import migrate


async def fresh_database(admin_dsn: str) -> str:
    """A new, migrated `sorami_demo` database beside the user's own."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DEMO_DATABASE}")
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, DEMO_DATABASE)
    await migrate(dsn)
    return dsn


def run(data_dir: Path, jobs: int, fast: bool) -> int:
    """Run the demo on the embedded PostgreSQL of `data_dir`; 0 when every invariant held."""
    plain = Console()
    # without a terminal (CI, a pipe) rich would wrap at 80 columns
    console = plain if plain.is_terminal else Console(width=120)
    with embedded_postgres(data_dir) as admin_dsn:
        dsn = asyncio.run(fresh_database(admin_dsn))
        return asyncio.run(Demo(console, jobs, fast).run(dsn))
