"""The webhook receiver: signed deliveries from the generator backend, applied exactly once."""

from __future__ import annotations

from aiohttp import web

from gateway import keys
from gateway.batching import setup_group_commit
from gateway.jobs.kinds import Kind
from gateway.usecases.ingest import ingest_alone, ingest_many
from gateway.webhooks.handlers import ROUTES, get_verifier, image_completion, video_completion
from gateway.webhooks.verify import Verifier

__all__ = ["ROUTES", "get_verifier", "setup_webhooks"]


def setup_webhooks(app: web.Application) -> None:
    """Decode the secrets once, add the two routes and their group-commit stage."""
    app[keys.WEBHOOK_VERIFIER] = Verifier.from_settings(app[keys.SETTINGS])
    app.router.add_post(ROUTES[Kind.IMAGE], image_completion)
    app.router.add_post(ROUTES[Kind.VIDEO], video_completion)
    setup_group_commit(app, keys.WEBHOOK_BATCHES, "webhook", ingest_many, ingest_alone,
                       app[keys.SETTINGS].webhook_batch_max)

