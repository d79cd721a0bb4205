"""A job's change history (job_events) and the LISTEN connection that hears new changes.

`store.jobs.apply` writes every visible change as a `job_events` row and sends
`pg_notify('sorami_job_events', '<job_id>:<seq>')` in the same transaction. A notification
only says "look again": readers always take the changes themselves from `job_events`, so a
notification lost while a listener reconnects costs nothing but a re-read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable

import asyncpg

from gateway.jobs.state import Status
from gateway.store.database import init_connection, translate_errors

LISTENER_APPLICATION_NAME = "sorami-job-events"


@dataclasses.dataclass(frozen=True, slots=True)
class JobEventRow:
    seq: int
    status: Status
    progress: int
    message: str | None
    error_message: str | None
    created_at: dt.datetime


# The failure's error text lives on the job (a FAILED event is final, so it is the same).
EVENTS_AFTER = """
SELECT e.seq, e.status, e.progress, e.message, e.created_at,
       CASE WHEN e.status = 'FAILED' THEN j.error_message END AS error_message
FROM job_events e JOIN jobs j ON j.id = e.job_id
WHERE e.job_id = $1 AND e.seq > $2
ORDER BY e.seq
"""


async def events_after(conn: asyncpg.Connection, job_id: str, seq: int) -> list[JobEventRow]:
    """Every change of a job after `seq`, in order."""
    rows = await conn.fetch(EVENTS_AFTER, job_id, seq)
    return [
        JobEventRow(
            seq=r["seq"],
            status=Status(r["status"]),
            progress=r["progress"],
            message=r["message"],
            error_message=r["error_message"],
            created_at=r["created_at"],
        )
        for r in rows
    ]


# Errors of a listening connection that mean "it is gone": reconnect.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


class Listener:
    """One dedicated connection LISTENing on one channel (a pooled one would be reset)."""

    def __init__(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        self._conn = conn
        self._lost = lost

    @classmethod
    async def open(
        cls, dsn: str, channel: str, on_payload: Callable[[str], None], *, seconds: float = 10.0
    ) -> Listener:
        with translate_errors():
            conn = await asyncpg.connect(
                dsn,
                timeout=seconds,
                server_settings={"application_name": LISTENER_APPLICATION_NAME},
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

    async def wait_lost(self, keepalive_seconds: float) -> None:
        """Return once the connection is gone: closed by the server, or a ping goes unanswered."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), keepalive_seconds)
                return
            except TimeoutError:
                pass
            try:
                async with asyncio.timeout(keepalive_seconds):
                    await self._conn.execute("SELECT 1")
            except CONNECTION_ERRORS:
                return

    async def close(self) -> None:
        if self._conn.is_closed():
            return
        try:
            async with asyncio.timeout(5):
                await self._conn.close()
        except CONNECTION_ERRORS:
            self._conn.terminate()
