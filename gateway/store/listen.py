"""The one LISTEN loop: a dedicated connection per channel, kept alive, reopened when lost.

A pooled connection cannot LISTEN (the pool hands it to others), so each listener opens its
own. A connection can die without the client hearing of it (a dropped network path), so an
idle one is pinged every `keepalive_seconds`; a ping that goes unanswered counts as lost.
NOTIFYs sent while nobody listened are gone: `on_listening` runs after every (re)connection
so the caller can look again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import structlog

from gateway.store.database import init_connection, translate_errors
from gateway.store.errors import StoreError

log = structlog.get_logger(__name__)

# Errors of a listening connection that mean "it is gone": reconnect.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

_LISTENER_ERRORS: tuple[type[BaseException], ...] = (StoreError, *CONNECTION_ERRORS)


class Listener:
    """One dedicated connection LISTENing on one channel."""

    def __init__(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        self._conn = conn
        self._lost = lost

    @classmethod
    async def open(
        cls,
        dsn: str,
        channel: str,
        on_payload: Callable[[str], None],
        *,
        application_name: str,
        seconds: float = 10.0,
    ) -> Listener:
        with translate_errors():
            conn = await asyncpg.connect(
                dsn, timeout=seconds, server_settings={"application_name": application_name}
            )
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            try:
                await init_connection(conn)
                await conn.add_listener(
                    channel, lambda _conn, _pid, _channel, payload: on_payload(payload)
                )
            except BaseException:
                conn.terminate()
                raise
        return cls(conn, lost)

    async def wait_lost(
        self, keepalive_seconds: float, stopping: asyncio.Event | None = None
    ) -> bool:
        """Wait until the connection is gone (closed by the server, or a ping goes
        unanswered): True; or until `stopping` is set: False."""
        stop = stopping if stopping is not None else asyncio.Event()
        while True:
            if await _first_of(self._lost, stop, keepalive_seconds):
                return not stop.is_set()
            try:
                async with asyncio.timeout(keepalive_seconds):
                    await self._conn.execute("SELECT 1")
            except CONNECTION_ERRORS:
                return True

    async def close(self) -> None:
        if self._conn.is_closed():
            return
        try:
            async with asyncio.timeout(5):
                await self._conn.close()
        except CONNECTION_ERRORS:
            self._conn.terminate()


async def listen(
    dsn: str,
    channel: str,
    on_payload: Callable[[str], None],
    *,
    application_name: str,
    on_listening: Callable[[], None],
    on_lost: Callable[[], None] | None = None,
    stopping: asyncio.Event | None = None,
    keepalive_seconds: float = 30.0,
    reconnect_delay: float = 0.5,
    max_reconnect_delay: float = 10.0,
) -> None:
    """LISTEN on `channel` until `stopping` is set (or the task is cancelled), reconnecting
    with a doubling delay after each failure; `on_payload` gets every NOTIFY's payload."""
    stop = stopping if stopping is not None else asyncio.Event()
    delay = reconnect_delay
    while not stop.is_set():
        listener: Listener | None = None
        try:
            listener = await Listener.open(
                dsn, channel, on_payload, application_name=application_name
            )
            log.info("listen_started", channel=channel)
            delay = reconnect_delay
            on_listening()
            if await listener.wait_lost(keepalive_seconds, stop):
                log.warning("listen_lost", channel=channel)
        except _LISTENER_ERRORS as exc:
            log.warning(
                "listen_failed", channel=channel, error=type(exc).__name__, retry_in_seconds=delay
            )
        except Exception:
            # notifications must come back whatever went wrong: log it and reconnect
            log.exception("listen_crashed", channel=channel)
        finally:
            if on_lost is not None:
                on_lost()
            if listener is not None:
                await listener.close()
        if stop.is_set():
            return
        await _first_of(stop, asyncio.Event(), delay)
        delay = min(delay * 2, max_reconnect_delay)


async def _first_of(first: asyncio.Event, second: asyncio.Event, seconds: float | None) -> bool:
    """Wait until either event is set (True) or `seconds` pass (False)."""
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        done, _ = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return bool(done)
