"""The error middleware: every failure becomes an RFC 9457 problem document."""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from gateway.errors import MalformedRequest, PayloadTooLarge, ProblemError, ServiceUnavailable
from gateway.store.errors import StoreUnavailable

log = structlog.get_logger(__name__)

PROBLEM_TYPE = "application/problem+json"
# the warning logged for every request refused as malformed HTTP (see gateway.malformed)
MALFORMED: Final = "http_request_malformed"
_encode = msgspec.json.Encoder().encode


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = {"type": f"urn:sorami:problem:{slug}", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status, body=_encode(body), content_type=PROBLEM_TYPE, headers=headers
    )


def problem_from(error: ProblemError) -> web.Response:
    response = problem_response(
        error.status,
        error.title,
        error.message,
        slug=error.slug,
        headers=error.headers(),
        **error.extra,
    )
    if error.closes_connection:
        response.force_close()
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as error:
        return problem_from(error)
    except StoreUnavailable as exc:
        # the cause (connection refused, too many connections, a deadlock...) is what an
        # operator needs to act on
        log.warning("database_unavailable", path=request.path, reason=str(exc))
        return problem_from(ServiceUnavailable())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return problem_from(PayloadTooLarge())
        return problem_response(
            exc.status, exc.reason, "", slug=exc.reason.lower().replace(" ", "-"),
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except web.RequestPayloadError as exc:
        # the body broke while it was read: a bad chunked encoding or content coding.
        # Nothing more of it is read: aiohttp would drain it after the answer, hit the same
        # error again and log it as a crash.
        request.content.feed_eof()
        return _malformed_body(request, f"The request body is malformed: "
                                        f"{describe_parse_failure(exc)}.")
    except Exception as exc:
        transport = request.transport
        if isinstance(exc, ConnectionResetError) and (
            transport is None or transport.is_closing()
        ):
            # the client left before its body was complete; no one will read the answer
            return _malformed_body(
                request, "The connection closed before the request body was complete."
            )
        log.exception("unhandled_error", method=request.method, path=request.path)
        return problem_response(500, "Internal Server Error", "", slug="internal-error")


def _malformed_body(request: web.Request, detail: str) -> web.Response:
    error = MalformedRequest(detail)
    log.warning(MALFORMED, status=error.status, reason=detail, peer=request.remote,
                method=request.method, path=request.path)
    return problem_from(error)


def describe_parse_failure(exc: BaseException) -> str:
    """aiohttp's words for a parse failure, without the client's bytes it quotes."""
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    lines = (_QUOTED.split(line, maxsplit=1)[0].strip().rstrip(":.") for line in text.splitlines())
    words = [line for line in lines if line and not _POINTER_OR_CODE.fullmatch(line)]
    return ("; ".join(words) or "malformed")[:200]


# aiohttp quotes the offending bytes, llhttp points at them on a line of their own, and a
# payload error starts with its status code ("400, message:")
_QUOTED: Final = re.compile(r"b'|b\"|bytearray\(")
_POINTER_OR_CODE: Final = re.compile(r"\^|\d{3}, message")
