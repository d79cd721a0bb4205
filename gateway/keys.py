"""Every piece of application state, as a typed AppKey, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.settings import Settings
from gateway.store.database import Database

if TYPE_CHECKING:
    # the type only: the webhook package uses the store, which uses these keys
    from gateway.webhooks.verify import Verifier

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
WEBHOOK_VERIFIER: web.AppKey[Verifier] = web.AppKey("webhook_verifier")
