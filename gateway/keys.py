"""Every piece of application state, as a typed AppKey, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.settings import Settings
from gateway.store.database import Database

if TYPE_CHECKING:  # these modules read their state through this one
    from gateway.auth import Authenticator
    from gateway.events import JobEventHub
    from gateway.openapi import Operation

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
JOB_EVENTS: web.AppKey[JobEventHub] = web.AppKey("job_events")
# (method, path template) -> its documentation, filled by each setup_x that adds routes
OPERATIONS: web.AppKey[dict[tuple[str, str], Operation]] = web.AppKey("operations")
