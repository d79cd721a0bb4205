"""`GET /api/jobs/{id}/events`: a job's live status as Server-Sent Events.

The current state at once (event id = the job's `seq`), then every change until a terminal
status, sent as an event of type `end`, after which the stream ends. A reconnecting client
sends `Last-Event-ID` and gets every change after it from `job_events`; one that already saw
the final state gets 204, which tells an EventSource to stop reconnecting. A comment line
every `heartbeat_seconds` keeps proxies from closing an idle stream and notices a client that
went away.
"""

from __future__ import annotations

from typing import Final

import msgspec
import structlog
from aiohttp import web

from gateway.api.jobs import JOB_NOT_FOUND
from gateway.api.schemas import JobEvent
from gateway.auth import authenticate
from gateway.database import get_database
from gateway.errors import NotFound
from gateway.events import JobEventHub, get_job_events
from gateway.store import Database, StoreError, owned_jobs
from gateway.store import events as store_events
from gateway.store.events import JobEventRow
from gateway.store.owned_jobs import JobView

log = structlog.get_logger(__name__)

HEARTBEAT: Final = b": keep-alive\n\n"
RETRY_MILLISECONDS: Final = 3000
# an EventSource delivers it to `addEventListener("end", ...)` rather than `onmessage`
END_EVENT: Final = b"event: end\n"

_encode = msgspec.json.Encoder().encode


def format_event(event: JobEvent) -> bytes:
    """One SSE event; the terminal status is typed `end`, so that a page can tell it apart."""
    kind = END_EVENT if event.status.terminal else b""
    return b"%sid: %d\ndata: %s\n\n" % (kind, event.seq, _encode(event))


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else None


class JobEventStream:
    """The SSE handler; `heartbeat_seconds` is how long a stream may stay silent."""

    def __init__(self, *, heartbeat_seconds: float = 15.0) -> None:
        self.heartbeat_seconds = heartbeat_seconds

    async def handle(self, request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request)
        job_id = request.match_info["id"]
        database = get_database(request.app)
        hub = get_job_events(request.app)
        # subscribe before reading, so that no change can fall between the read and the wait
        with hub.subscribe(job_id) as subscription:
            async with database.connection() as conn:
                job = await owned_jobs.get_owned(conn, job_id, principal.user_id, None)
            if job is None:
                raise NotFound(JOB_NOT_FOUND)
            last_seen = _last_event_id(request)
            if last_seen is not None and not 1 <= last_seen <= job.seq:
                last_seen = None  # not an id of this job: start from its current state
            if last_seen == job.seq and job.status.terminal:
                return web.Response(status=204)

            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            try:
                await response.write(b"retry: %d\n\n" % RETRY_MILLISECONDS)
                if last_seen is None:
                    await response.write(format_event(_current(job)))
                    last_seen = job.seq
                    finished = job.status.terminal
                else:
                    last_seen, finished = await self._send_since(
                        response, hub, database, job, last_seen, subscription.generation
                    )
                while not finished and not subscription.closed:
                    if not await subscription.wait(self.heartbeat_seconds):
                        await response.write(HEARTBEAT)
                        continue
                    last_seen, finished = await self._send_since(
                        response, hub, database, job, last_seen, subscription.generation
                    )
                await response.write_eof()
            except ConnectionResetError:
                log.debug("job_events_client_gone", job_id=job_id)
            except StoreError as exc:
                # headers are sent: end the stream; the client resumes with Last-Event-ID
                log.warning("job_events_stream_interrupted", job_id=job_id,
                            error=type(exc).__name__)
        return response

    async def _send_since(
        self,
        response: web.StreamResponse,
        hub: JobEventHub,
        database: Database,
        job: JobView,
        seq: int,
        woken: int,
    ) -> tuple[int, bool]:
        """Write every change after `seq`; return the last seq sent and whether it was final.

        The subscribers of the job woken by the same notification share one read and its
        encoded events (`hub.shared`)."""
        events = await hub.shared(job.id, seq, woken, lambda: _read_since(database, job, seq))
        finished = False
        for event_seq, terminal, encoded in events:
            await response.write(encoded)
            seq, finished = event_seq, terminal
        return seq, finished


async def _read_since(
    database: Database, job: JobView, seq: int
) -> list[tuple[int, bool, bytes]]:
    """The job's changes after `seq`, as (seq, terminal, encoded event)."""
    async with database.connection() as conn:
        rows = await store_events.events_after(conn, job.id, seq)
    return [(row.seq, row.status.terminal, format_event(_event(job, row))) for row in rows]


def _current(job: JobView) -> JobEvent:
    return JobEvent(
        job_id=job.id,
        kind=job.kind,
        seq=job.seq,
        status=job.status,
        progress=job.progress,
        message=job.message,
        error_message=job.error_message,
        updated_at=job.updated_at,
    )


def _event(job: JobView, row: JobEventRow) -> JobEvent:
    return JobEvent(
        job_id=job.id,
        kind=job.kind,
        seq=row.seq,
        status=row.status,
        progress=row.progress,
        message=row.message,
        error_message=row.error_message,
        updated_at=row.created_at,
    )
