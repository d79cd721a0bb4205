"""The database as an application resource: its pool opened on startup, closed on cleanup."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.store.database import Database
from gateway.store.errors import MigrationError


def setup_database(app: web.Application) -> None:
    """Open the pool on startup and close it on cleanup."""

    async def database_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[keys.SETTINGS]
        if settings.database_url is None:
            raise MigrationError("no database URL: resolve the embedded default before serving")
        database = await Database.open(
            settings.database_url.reveal(),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
        )
        app[keys.DATABASE] = database
        try:
            yield
        finally:
            await database.close()

    app.cleanup_ctx.append(database_ctx)


def get_database(app: web.Application) -> Database:
    try:
        return app[keys.DATABASE]
    except KeyError:
        raise RuntimeError("the database is not set up: call setup_database(app)") from None
