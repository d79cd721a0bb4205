from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.settings import Secret, Settings
from gateway.store import Database
from tests.pg import Databases, admin_dsn

WEBHOOK_KEY = b"sorami-test-webhook-key-32-bytes"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(WEBHOOK_KEY).decode()
HS256_SECRET = "sorami-test-hs256-secret-that-is-long-enough"


@pytest.fixture(autouse=True)
def _stop_what_the_test_started() -> Iterator[None]:
    """A process a test started is stopped when the test ends, whether it passed or not."""
    from tests import procs  # it imports this module's secrets

    first = len(procs.STARTED)
    yield
    for proc in procs.STARTED[first:]:
        proc.stop()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if anything it started outlived it (after every fixture's teardown)."""
    from tests import procs

    left = procs.still_running()
    if not left:
        return
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for pid, command in left:
            reporter.write_line(f"left running by the tests (now killed): {pid} {command}",
                                red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def databases() -> Iterator[Databases]:
    with admin_dsn() as admin:
        dbs = Databases(admin)
        asyncio.run(dbs.create_template())
        try:
            yield dbs
        finally:
            asyncio.run(dbs.drop_template())


@pytest.fixture
async def database_url(databases: Databases) -> AsyncIterator[str]:
    """A fresh, migrated database of its own for this test."""
    dsn = await databases.clone()
    try:
        yield dsn
    finally:
        await databases.drop(dsn)


@pytest.fixture
async def empty_database_url(databases: Databases) -> AsyncIterator[str]:
    """A fresh database with nothing in it, not even the migrations."""
    dsn = await databases.create_empty()
    try:
        yield dsn
    finally:
        await databases.drop(dsn)


@pytest.fixture
def make_settings(database_url: str, tmp_path: Any) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base = Settings(
            database_url=Secret(database_url),
            data_dir=tmp_path / "data",
            webhook_secrets=(Secret(WEBHOOK_SECRET),),
            auth_hs256_secret=Secret(HS256_SECRET),
            db_pool_min=1,
            db_pool_max=5,
        )
        return base.replace(**overrides) if overrides else base

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The test's database, for arranging and asserting."""
    database = await Database.open(database_url, min_size=1, max_size=3)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(
    app: web.Application, aiohttp_client: Callable[..., Any]
) -> TestClient[web.Request, web.Application]:
    # app first: its database is set up before the client and dropped after it closes
    result: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    return result
