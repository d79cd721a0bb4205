"""The application factory: it only wires things together."""

from __future__ import annotations

from aiohttp import web

from gateway import keys
from gateway.api import setup_api
from gateway.auth import setup_auth
from gateway.database import setup_database
from gateway.deadlines import body_deadline_middleware
from gateway.delivery import setup_delivery
from gateway.events import setup_events
from gateway.health import setup_health
from gateway.malformed import handler_args, header_limit_middleware
from gateway.metrics.exposition import setup_metrics
from gateway.middleware import error_middleware
from gateway.observability import setup_observability
from gateway.openapi import setup_openapi
from gateway.review import setup_review
from gateway.settings import Settings
from gateway.webhooks import setup_webhooks


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, header_limit_middleware, body_deadline_middleware],
        client_max_size=settings.request_max_body_bytes,
        handler_args=handler_args(settings),
    )
    app[keys.SETTINGS] = settings
    setup_database(app)
    setup_health(app)
    setup_auth(app)
    setup_events(app)
    setup_api(app)
    setup_review(app)
    setup_delivery(app)
    setup_observability(app)
    setup_metrics(app)
    setup_webhooks(app)
    setup_openapi(app)
    return app
