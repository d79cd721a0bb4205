"""The store: the only code that talks to PostgreSQL. Nothing web is imported here, so the
reconciler can use it; the pool as an application resource is in `gateway.database`."""

from __future__ import annotations

from gateway.store.database import Database
from gateway.store.errors import Duplicate, MigrationError, StoreError, StoreUnavailable

__all__ = [
    "Database",
    "Duplicate",
    "MigrationError",
    "StoreError",
    "StoreUnavailable",
]
