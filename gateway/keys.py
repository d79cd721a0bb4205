"""Every piece of application state, as a typed AppKey, in one place."""

from __future__ import annotations

from aiohttp import web

from gateway.delivery.dispatcher import Dispatcher
from gateway.settings import Settings
from gateway.store.database import Database

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
