"""Delivery: committed outbox rows sent to the generator backend, with retries.

`setup_delivery(app)` runs one dispatcher per server process, started with the app when
`BACKEND_URL` is set and stopped gracefully with it; the ClientSession lives alongside.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from gateway import keys
from gateway.database import get_database
from gateway.delivery.backend import BackendClient
from gateway.delivery.dispatcher import Dispatcher

__all__ = ["BackendClient", "Dispatcher", "get_dispatcher", "setup_delivery"]

log = structlog.get_logger(__name__)


def setup_delivery(app: web.Application) -> None:
    """Start the dispatcher after the database, stop it before the database closes."""

    async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[keys.SETTINGS]
        if settings.backend_url is None:
            log.info("delivery_disabled", reason="BACKEND_URL is not set")
            yield
            return
        async with aiohttp.ClientSession(
            # the backend's cookies are not state this gateway keeps
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "sorami-gateway"},
        ) as session:
            dispatcher = Dispatcher(
                get_database(app),
                BackendClient(session, settings.backend_url, settings.backend_api_key),
                settings,
            )
            app[keys.DISPATCHER] = dispatcher
            await dispatcher.start()
            try:
                yield
            finally:
                await dispatcher.stop()

    app.cleanup_ctx.append(delivery_ctx)


def get_dispatcher(app: web.Application) -> Dispatcher:
    try:
        return app[keys.DISPATCHER]
    except KeyError:
        raise RuntimeError(
            "delivery is not running: call setup_delivery(app) and set BACKEND_URL"
        ) from None
