"""The application factory: it only wires things together."""

from __future__ import annotations

from aiohttp import web

from gateway import keys
from gateway.health import setup_health
from gateway.middleware import error_middleware
from gateway.settings import Settings
from gateway.store import setup_database
from gateway.webhooks import setup_webhooks


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.request_max_body_bytes,
    )
    app[keys.SETTINGS] = settings
    setup_database(app)
    setup_health(app)
    setup_webhooks(app)
    return app
