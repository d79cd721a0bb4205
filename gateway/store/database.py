"""The asyncpg pool, its JSON codecs, and the translation of driver errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import msgspec

from gateway.store.errors import Duplicate, StoreError, StoreUnavailable

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


def json_text(value: Any) -> str:
    """A value as the JSON text the jsonb codec sends (for jsonb passed inside arrays)."""
    return _json_encode(value).decode()

# Errors that mean "the database is not there right now", as opposed to a bad query.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionFailureError,
    # raised when a connection killed mid-protocol is reused ("cannot switch to state ...")
    asyncpg.InternalClientError,
)


# shutdown, connection loss, and conflicts (deadlock, serialization) a retry resolves
_RETRYABLE = frozenset({"57P01", "57P02", "57P03", "08006", "08003", "40P01", "40001"})


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise driver errors as store errors (procrastinate-style wrap_exceptions)."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise Duplicate(str(exc)) from exc
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    except asyncpg.PostgresError as exc:
        sqlstate = getattr(exc, "sqlstate", "")
        if sqlstate in _RETRYABLE:
            raise StoreUnavailable(f"database unavailable: {sqlstate}") from exc
        raise StoreError(str(exc)) from exc


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: jsonb and json as Python objects through msgspec."""
    for name in ("jsonb", "json"):
        await conn.set_type_codec(
            name,
            encoder=json_text,
            decoder=_json_decode,
            schema="pg_catalog",
        )


async def reset_connection(conn: asyncpg.Connection) -> None:
    """Before a connection goes back to the pool: end a transaction left open, nothing more.

    Pooled connections keep no session state (listeners and session advisory locks use
    connections of their own), so asyncpg's default reset (UNLISTEN, RESET ALL, unlock all,
    CLOSE ALL) would be one more round trip per request for nothing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection with the project's codecs, for CLIs and listeners."""
    with translate_errors():
        conn = await asyncpg.connect(dsn)
        await init_connection(conn)
        return conn


class Database:
    """Owns the asyncpg pool; store functions borrow connections from it.

    Borrowers queue first come, first served. asyncpg's pool hands a returned connection
    to whichever task asks next, not to the one that waited longest: a waiter woken for a
    connection that a newcomer took meanwhile goes to the back of the line again. Under
    load that made some webhooks wait several times as long as the median. A semaphore
    of the pool's size, which serves its waiters in order, admits borrowers to the pool,
    which then always has a connection ready for them.
    """

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self._turns = asyncio.Semaphore(pool.get_max_size())

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> Database:
        with translate_errors():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=init_connection,
                reset=reset_connection,
                command_timeout=30,
                max_inactive_connection_lifetime=300,
            )
        return cls(pool, dsn)

    async def close(self, seconds: float = 10.0) -> None:
        """Close the connections gracefully, or after `seconds` terminate them: asyncpg waits
        for every borrowed connection to come back, and a shutdown must not hang on one."""
        try:
            await asyncio.wait_for(self.pool.close(), seconds)
        except TimeoutError:
            self.pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._turns:
            with translate_errors():
                async with self.pool.acquire() as conn:
                    yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside one transaction: committed on exit, rolled back on error."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            record: asyncpg.Record | None = await conn.fetchrow(query, *args)
            return record

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return list(await conn.fetch(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            return str(await conn.execute(query, *args))


# A transaction that commits without waiting for its WAL flush: for work whose loss in a
# database crash is redone by the next run. Set for the transaction only (is_local): the
# connection's next transactions wait for their flush again.
ASYNC_COMMIT = """
SELECT set_config('synchronous_commit', 'off', true)
"""


async def commit_without_flush(conn: asyncpg.Connection) -> None:
    """The caller's open transaction commits without waiting for its WAL flush."""
    assert conn.is_in_transaction(), "synchronous_commit is set per transaction"
    await conn.execute(ASYNC_COMMIT)


def rowcount(status: str) -> int:
    """A command's status as its row count: 'DELETE 12' / 'INSERT 0 12' -> 12."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
