"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.database import get_database
from gateway.store import StoreError
from gateway.store.migrations import is_current

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """The database answers and every migration in sql/ is applied."""
    database = get_database(request.app)
    try:
        async with asyncio.timeout(2), database.connection() as conn:
            current = await is_current(conn)
    except (StoreError, TimeoutError):
        return web.json_response(
            {"status": "unavailable", "database": "unreachable"},
            status=503,
            headers={"Retry-After": "5"},
        )
    if not current:
        return web.json_response(
            {"status": "unavailable", "database": "migrations pending"}, status=503
        )
    return web.json_response({"status": "ready"})


def setup_health(app: web.Application) -> None:
    app.add_routes(routes)
