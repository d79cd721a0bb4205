"""The client API (`/api/...`, bearer JWT or session cookie): one table that both registers
and documents it.

Each row pairs a handler with its `Operation` (what it takes and answers, as msgspec types);
`setup_api` adds the routes and their descriptions from the same rows, so `/openapi.json`
cannot describe a route differently from the one served.
"""

from __future__ import annotations

import dataclasses

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import keys
from gateway.api import jobs, notifications
from gateway.api.events import JobEventStream
from gateway.api.schemas import (
    REQUEST_TYPES,
    GalleryQuery,
    IdempotencyKey,
    ImageGallery,
    ImageResult,
    JobAccepted,
    JobEvent,
    JobStatusView,
    NotificationPage,
    NotificationQuery,
    NotificationView,
    VideoGallery,
    VideoResult,
)
from gateway.batching import setup_group_commit
from gateway.cors import setup_cors
from gateway.jobs.kinds import Kind
from gateway.openapi import (
    NOT_FOUND,
    UNAUTHORIZED,
    UNAVAILABLE,
    Header,
    Operation,
    Reply,
    problem,
    register,
)
from gateway.usecases.jobs import create_alone, create_many

__all__ = ["Route", "routes", "setup_api"]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    operation: Operation
    handler: Handler


_RESULTS = {Kind.IMAGE: ImageResult, Kind.VIDEO: VideoResult}
_GALLERIES = {Kind.IMAGE: ImageGallery, Kind.VIDEO: VideoGallery}


def _job_routes(kind: Kind) -> list[Route]:
    base, tag, noun = f"/api/{kind.plural}", kind.plural, kind.value
    return [
        Route(
            Operation(
                "POST", f"{base}/generate", f"generate{kind.label.title()}",
                f"Create a job generating {kind.plural}", tag,
                description=(
                    "The job and its delivery to the generator are committed before the "
                    "answer; the generator is called in the background, with retries. "
                    "Per-user limits apply (active jobs, jobs per hour); a replay of an "
                    "accepted create with its Idempotency-Key is never refused."
                ),
                body=REQUEST_TYPES[kind],
                headers=(Header(jobs.IDEMPOTENCY_HEADER,
                                "retrying with the same key and body returns the same job; "
                                "the same key with another body is 422",
                                schema=IdempotencyKey),),
                bearer=True,
                replies=(
                    Reply(202, "The job is committed", JobAccepted,
                          headers=("Idempotent-Replayed", "RateLimit-Policy", "RateLimit")),
                    problem(400, "The body is not JSON"),
                    UNAUTHORIZED,
                    problem(413, "The body, or the input image, is too large"),
                    problem(422, "A field is invalid; `field` names it"),
                    problem(429, "The caller is at a limit on creating jobs of this kind; "
                                 "`limit` names it, `value` is its value; nothing was created",
                            "Retry-After", "RateLimit-Policy", "RateLimit"),
                    UNAVAILABLE,
                ),
            ),
            jobs.generate(kind),
        ),
        Route(
            Operation(
                "GET", f"{base}/{{id}}/status", f"{noun}Status",
                f"The status of one of the caller's {noun} jobs", tag, bearer=True,
                replies=(Reply(200, "The job's status", JobStatusView), UNAUTHORIZED,
                         NOT_FOUND, UNAVAILABLE),
            ),
            jobs.status(kind),
        ),
        Route(
            Operation(
                "GET", f"{base}/{{id}}/result", f"{noun}Result",
                f"The files and metadata of one of the caller's {noun} jobs", tag, bearer=True,
                description="Files are listed once the job is COMPLETED; empty before.",
                replies=(Reply(200, "The job's result", _RESULTS[kind]), UNAUTHORIZED,
                         NOT_FOUND, UNAVAILABLE),
            ),
            jobs.result(kind),
        ),
        Route(
            Operation(
                "GET", f"{base}/user", f"{noun}Gallery",
                f"The caller's {noun} jobs, newest first, files included", tag, bearer=True,
                query=GalleryQuery,
                description="Cursor pagination: pages stay stable while new jobs are created.",
                replies=(Reply(200, "One page", _GALLERIES[kind]), UNAUTHORIZED,
                         problem(422, "A bad `limit` or `cursor`"), UNAVAILABLE),
            ),
            jobs.gallery(kind),
        ),
        Route(
            Operation(
                "POST", f"{base}/{{id}}/cancel", f"cancel{kind.label.title()}",
                f"Cancel one of the caller's {noun} jobs that is not finished", tag, bearer=True,
                description="The job becomes CANCELLED at once; the generator is asked to "
                "stop on a best-effort basis.",
                replies=(Reply(200, "The job, now CANCELLED", JobStatusView), UNAUTHORIZED,
                         NOT_FOUND, problem(409, "The job is already finished"), UNAVAILABLE),
            ),
            jobs.cancel(kind),
        ),
    ]


def routes(*, heartbeat_seconds: float = 15.0) -> list[Route]:
    """Every client route, in the order they are registered."""
    table = _job_routes(Kind.IMAGE) + _job_routes(Kind.VIDEO)
    table.append(Route(
        Operation(
            "GET", "/api/jobs/{id}/events", "jobEvents",
            "The live status of one of the caller's jobs (Server-Sent Events)", "jobs",
            bearer=True,
            description=(
                "Each event's `id` is the job's `seq` and its `data` a JobEvent: the current "
                "state at once, then every change; the stream ends after a terminal status. "
                "Send `Last-Event-ID` when reconnecting to receive every change after it. "
                f"A comment line arrives every {heartbeat_seconds:g} s while nothing changes."
            ),
            headers=(Header("Last-Event-ID", "the last event id received, to resume"),),
            replies=(
                Reply(200, "An event stream; each event's data is a JobEvent", JobEvent,
                      content_type="text/event-stream"),
                Reply(204, "The client already has the final state: do not reconnect"),
                UNAUTHORIZED, NOT_FOUND, UNAVAILABLE,
            ),
        ),
        JobEventStream(heartbeat_seconds=heartbeat_seconds).handle,
    ))
    table.append(Route(
        Operation(
            "GET", "/api/notifications", "listNotifications",
            "The caller's notifications, newest first", "notifications", bearer=True,
            query=NotificationQuery,
            replies=(Reply(200, "One page", NotificationPage), UNAUTHORIZED,
                     problem(422, "A bad `limit`, `unread` or `cursor`"), UNAVAILABLE),
        ),
        notifications.list_notifications,
    ))
    table.append(Route(
        Operation(
            "POST", "/api/notifications/{id}/read", "readNotification",
            "Mark one of the caller's notifications read (idempotent)", "notifications",
            bearer=True,
            replies=(Reply(200, "The notification", NotificationView), UNAUTHORIZED,
                     NOT_FOUND, UNAVAILABLE),
        ),
        notifications.mark_read,
    ))
    return table


def setup_api(app: web.Application) -> None:
    table = routes(heartbeat_seconds=app[keys.SETTINGS].sse_heartbeat_seconds)
    for route in table:
        app.router.add_route(route.operation.method, route.operation.path, route.handler)
    register(app, (route.operation for route in table))
    setup_cors(app, (route.operation.key for route in table))
    setup_group_commit(app, keys.CREATE_BATCHES, "create", create_many, create_alone,
                       app[keys.SETTINGS].create_batch_max)
