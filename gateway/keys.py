"""Every piece of application state, as a typed AppKey, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.settings import Settings
from gateway.store.database import Database

if TYPE_CHECKING:
    # annotations only: these modules import the store, which imports this module
    from gateway.auth import Authenticator
    from gateway.batching import GroupCommit
    from gateway.cors import Cors
    from gateway.delivery.dispatcher import Dispatcher
    from gateway.events import JobEventHub
    from gateway.metrics.database import DatabaseGauges
    from gateway.openapi import Operation
    from gateway.store.owned_jobs import CreateRequest, Creation
    from gateway.store.webhooks import Delivery
    from gateway.usecases.ingest import Ingested
    from gateway.webhooks.verify import Verifier

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
DATABASE_GAUGES: web.AppKey[DatabaseGauges] = web.AppKey("database_gauges")
WEBHOOK_VERIFIER: web.AppKey[Verifier] = web.AppKey("webhook_verifier")
# the group-commit stages (absent when WEBHOOK_BATCH_MAX / CREATE_BATCH_MAX turn them off)
WEBHOOK_BATCHES: web.AppKey[GroupCommit[Delivery, Ingested]] = web.AppKey("webhook_batches")
CREATE_BATCHES: web.AppKey[GroupCommit[CreateRequest, Creation]] = web.AppKey("create_batches")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
JOB_EVENTS: web.AppKey[JobEventHub] = web.AppKey("job_events")
CORS: web.AppKey[Cors] = web.AppKey("cors")
# (method, path template) -> its documentation, filled by each setup_x that adds routes
OPERATIONS: web.AppKey[dict[tuple[str, str], Operation]] = web.AppKey("operations")
