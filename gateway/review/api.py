"""The review console's JSON API (`/api/review/...`): thin handlers around `queue`."""

from __future__ import annotations

from aiohttp import web

from gateway.api.jobs import respond
from gateway.api.schemas import decode_body, decode_query
from gateway.database import get_database
from gateway.errors import NotFound
from gateway.jobs.kinds import Kind
from gateway.review import queue
from gateway.review.access import CSRF_HEADER, acting_operator, operator


def orphan_key(request: web.Request) -> tuple[Kind, str]:
    """(kind, backend job id) of the path; an unknown kind is as absent as a missing orphan."""
    try:
        kind = Kind(request.match_info["kind"])
    except ValueError:
        raise NotFound("No such orphan.") from None
    return kind, request.match_info["backend_job_id"]


async def list_orphans(request: web.Request) -> web.StreamResponse:
    await operator(request)
    query = decode_query(dict(request.query), queue.ReviewQuery)
    return respond(await queue.page(get_database(request.app), query))


async def show_orphan(request: web.Request) -> web.StreamResponse:
    await operator(request)
    kind, backend_job_id = orphan_key(request)
    return respond(await queue.orphan(get_database(request.app), kind, backend_job_id))


async def assign(request: web.Request) -> web.StreamResponse:
    principal = await acting_operator(request, request.headers.get(CSRF_HEADER))
    kind, backend_job_id = orphan_key(request)
    body = decode_body(await request.read(), queue.AssignBody)
    return respond(await queue.assign(get_database(request.app), kind, backend_job_id, body,
                                      principal.user_id))


async def dismiss(request: web.Request) -> web.StreamResponse:
    principal = await acting_operator(request, request.headers.get(CSRF_HEADER))
    kind, backend_job_id = orphan_key(request)
    body = decode_body(await request.read(), queue.DismissBody)
    return respond(await queue.dismiss(get_database(request.app), kind, backend_job_id,
                                       body.reason, principal.user_id))


async def bulk_dismiss(request: web.Request) -> web.StreamResponse:
    principal = await acting_operator(request, request.headers.get(CSRF_HEADER))
    body = decode_body(await request.read(), queue.BulkDismissBody)
    return respond(await queue.bulk_dismiss(get_database(request.app), body,
                                            principal.user_id))
