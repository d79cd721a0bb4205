"""The error middleware: every failure becomes an RFC 9457 problem document."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import PayloadTooLarge, ProblemError, ServiceUnavailable
from gateway.store.errors import StoreUnavailable

log = structlog.get_logger(__name__)

PROBLEM_TYPE = "application/problem+json"
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
    return problem_response(
        error.status,
        error.title,
        error.message,
        slug=error.slug,
        headers=error.headers(),
        **error.extra,
    )


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
    except Exception:
        log.exception("unhandled_error", method=request.method, path=request.path)
        return problem_response(500, "Internal Server Error", "", slug="internal-error")
