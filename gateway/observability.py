"""Per-request context, the access log line and the HTTP duration histogram.

`observe_requests` is the outermost middleware: it binds `request_id` (the caller's
`X-Request-ID` when it is sane, else a new one) to structlog's context for every line
logged while the request is handled, echoes it in the response, and records the request
under its route template (never the raw path, so label values stay a bounded set).
Handlers add what they learn with `bind_context(job_id=..., webhook_id=..., user_id=...)`;
the context ends with the request.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import re
import secrets
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Histogram

from gateway.metrics import HTTP_IN_FLIGHT, HTTP_REQUEST_DURATION

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# visible ASCII, bounded: safe to echo in a header and to log
_SANE_REQUEST_ID = re.compile(r"[!-~]{1,128}")
UNMATCHED_ROUTE = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# scraped and probed every few seconds: their access lines are debug, not info
_QUIET_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sorami_request_id", default=None
)


class _RequestIds:
    """Unique ids without a random read per request: a random prefix per process (drawn
    again in a forked child) and a counter."""

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count()

    def next(self) -> str:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._prefix = secrets.token_hex(10)
            self._counter = itertools.count()
        return f"{self._prefix}{next(self._counter):012x}"


_new_request_id = _RequestIds().next


def request_id_from(header: str | None) -> str:
    """The caller's request id when it is sane, else a new one (32 hex digits)."""
    if header is not None and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return _new_request_id()


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    return _request_id.get()


def bind_context(
    *, job_id: str | None = None, webhook_id: str | None = None, user_id: str | None = None
) -> None:
    """Add what a handler learned to every later log line of this request."""
    known = {"job_id": job_id, "webhook_id": webhook_id, "user_id": user_id}
    structlog.contextvars.bind_contextvars(**{k: v for k, v in known.items() if v is not None})


def route_template(request: web.Request) -> str:
    """`/api/images/{id}/status` for any id; one label for everything no route matched."""
    resource = request.match_info.route.resource
    if resource is None or request.match_info.http_exception is not None:
        return UNMATCHED_ROUTE
    return resource.canonical


_STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}
# the histogram's children by label values, bound once each rather than looked up per request
_durations: dict[tuple[str, str, int], Histogram] = {}


def _duration(method: str, route: str, status: int) -> Histogram:
    key = (method, route, status // 100)
    child = _durations.get(key)
    if child is None:
        status_class = _STATUS_CLASSES.get(key[2], f"{key[2]}xx")
        child = _durations[key] = HTTP_REQUEST_DURATION.labels(method, route, status_class)
    return child


@web.middleware
async def observe_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    token = _request_id.set(request_id)
    # a fresh context per request, whatever the server's task carried in
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    HTTP_IN_FLIGHT.inc()
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # what the error middleware lets through (3xx)
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's word for it), not a server error
            raise
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
    finally:
        HTTP_IN_FLIGHT.dec()
        elapsed = time.perf_counter() - started
        route = route_template(request)
        method = request.method if request.method in _METHODS else "other"
        _duration(method, route, status).observe(elapsed)
        access = log.debug if route in _QUIET_ROUTES else log.info
        access(
            "http_request",
            method=request.method,
            route=route,
            path=request.path,
            status=status,
            duration_ms=round(elapsed * 1000, 3),
        )
        structlog.contextvars.clear_contextvars()
        _request_id.reset(token)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Responses a handler prepares itself (streams) get the id before headers are sent."""
    request_id = current_request_id()
    if request_id is not None and REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request_id


def setup_observability(app: web.Application) -> None:
    """Make `observe_requests` the outermost middleware and echo ids on streamed responses.

    Outermost, it sees the final status of every request, including the error middleware's
    problem documents, and its context covers every line logged while handling it.
    """
    app.middlewares.insert(0, observe_requests)
    app.on_response_prepare.append(_echo_request_id)
