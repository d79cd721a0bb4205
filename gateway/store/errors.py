"""Store errors: driver exceptions are translated into these at the store boundary."""

from __future__ import annotations

from gateway.errors import GatewayError


class StoreError(GatewayError):
    """The database refused the operation."""


class StoreUnavailable(StoreError):
    """The database is unavailable."""


class Duplicate(StoreError):
    """A row with the same unique key exists already."""


class MigrationError(StoreError):
    """The database schema does not match the migrations in sql/."""
