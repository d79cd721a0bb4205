"""Malformed requests: answered as problem documents and logged as one warning line.

aiohttp refuses what its parser cannot read before any handler runs: an over-long request
line or header field, too many header fields, a bad method or version, invalid characters
in a header, a broken chunked body. Left to itself it answers a plain-text 400 and logs an
error-level line with a traceback, as if the gateway had crashed. `ProblemRequestHandler` is
aiohttp's connection protocol with that one hook (`handle_error`) replaced:

- a request line over `HTTP_MAX_REQUEST_LINE_BYTES`: 414;
- a header field over `HTTP_MAX_HEADER_FIELD_BYTES`, or more than 128 of them: 431;
- anything else the parser refuses: 400;

as `application/problem+json`, the connection closed, and one `http_request_malformed`
warning naming the peer, the limit and the size. Past the parser, `header_limit_middleware`
refuses header fields whose total is over `HTTP_MAX_HEADER_BYTES` (431), and the error
middleware answers a body that breaks while a handler reads it the same way (400).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, Protocol, runtime_checkable

import structlog
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

from gateway import keys
from gateway.errors import HeaderFieldsTooLarge, MalformedRequest, UriTooLong
from gateway.middleware import MALFORMED, describe_parse_failure, problem_from
from gateway.settings import Settings

log = structlog.get_logger(__name__)

# aiohttp's default count of header fields, kept (the sizes are what operators tune)
MAX_HEADER_FIELDS: Final = 128
# the message of both of aiohttp's parsers, and its only sign of this refusal
_TOO_MANY_HEADERS: Final = "Too many headers received"


def handler_args(settings: Settings) -> dict[str, int]:
    """The parser's limits, for `web.Application(handler_args=...)`."""
    return {
        "max_line_size": settings.http_max_request_line_bytes,
        "max_field_size": settings.http_max_header_field_bytes,
        "max_headers": MAX_HEADER_FIELDS,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class HeadSoFar:
    """What a connection received of the request head being read."""

    request_line_bytes: int
    received_bytes: int


@runtime_checkable
class HeadTracker(Protocol):
    """A connection's outer protocol that follows each request head (`DeadlineSite`'s)."""

    def head_so_far(self) -> HeadSoFar | None: ...


class ProblemRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, answering what its parser refuses as problems."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            # not the parser's: aiohttp's own handler timeout, or a failure past the
            # error middleware, which is a crash and keeps aiohttp's error line
            return super().handle_error(request, status, exc, message)
        transport = self.transport
        outer = transport.get_protocol() if transport is not None else None
        head = outer.head_so_far() if isinstance(outer, HeadTracker) else None
        error, sizes = refusal(exc, head, self.max_line_size, self.max_field_size)
        log.warning(MALFORMED, status=error.status, reason=error.message, peer=request.remote,
                    **sizes)
        if request.writer.output_size > 0:
            # as aiohttp does: an answer already started cannot be replaced
            raise ConnectionError("the response had started when the request broke")
        return problem_from(error)


def refusal(
    exc: HttpProcessingError, head: HeadSoFar | None, line_limit: int, field_limit: int
) -> tuple[MalformedRequest, dict[str, Any]]:
    """The answer to what the parser refused, and the sizes to log with it."""
    sizes: dict[str, Any] = {}
    if head is not None:
        sizes = {"request_line_bytes": head.request_line_bytes,
                 "head_bytes_received": head.received_bytes}
    if isinstance(exc, LineTooLong):
        if head is None:
            # bytes of a pipelined request: which line overflowed is not known
            return MalformedRequest(
                "A request line or header field is longer than the server accepts."
            ), sizes
        if head.request_line_bytes > line_limit:
            return UriTooLong(
                f"The request line is longer than {line_limit} bytes."
            ), {"limit_bytes": line_limit, **sizes}
        return HeaderFieldsTooLarge(
            f"A header field is longer than {field_limit} bytes."
        ), {"limit_bytes": field_limit, **sizes}
    if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
        return HeaderFieldsTooLarge(
            f"The request has more than {MAX_HEADER_FIELDS} header fields."
        ), {"limit_fields": MAX_HEADER_FIELDS, **sizes}
    detail = f"The request is not well-formed HTTP: {describe_parse_failure(exc)}."
    return MalformedRequest(detail), sizes


@web.middleware
async def header_limit_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Header fields the parser accepted one by one, but over the limit of their total."""
    limit = request.config_dict[keys.SETTINGS].http_max_header_bytes
    # each field as it came: name, ": ", value, CRLF
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if size > limit:
        error = HeaderFieldsTooLarge(
            f"The header fields total {size} bytes, more than {limit}."
        )
        log.warning(MALFORMED, status=error.status, reason=error.message, peer=request.remote,
                    limit_bytes=limit, size_bytes=size)
        raise error
    return await handler(request)
