"""Live job changes for Server-Sent Events: one LISTEN connection per process, fanned out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.events.hub import JobEventHub, Subscription

__all__ = ["JobEventHub", "Subscription", "get_job_events", "setup_events"]


def setup_events(app: web.Application) -> None:
    """Start the hub's listener with the app; end live streams first on shutdown."""

    async def events_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[keys.SETTINGS]
        if settings.database_url is None:
            raise RuntimeError("no database URL: resolve the embedded default before serving")
        hub = JobEventHub(settings.database_url.reveal())
        app[keys.JOB_EVENTS] = hub
        hub.start()
        try:
            yield
        finally:
            await hub.close()

    async def end_streams(app: web.Application) -> None:
        get_job_events(app).close_subscribers()

    app.cleanup_ctx.append(events_ctx)
    app.on_shutdown.append(end_streams)


def get_job_events(app: web.Application) -> JobEventHub:
    try:
        return app[keys.JOB_EVENTS]
    except KeyError:
        raise RuntimeError("live job events are not set up: call setup_events(app)") from None
