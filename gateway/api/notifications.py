"""Client routes for the caller's notifications: list (newest first) and mark read."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway.api import cursors
from gateway.api.jobs import respond
from gateway.api.schemas import NotificationPage, NotificationQuery, NotificationView, decode_query
from gateway.auth import authenticate
from gateway.database import get_database
from gateway.errors import NotFound
from gateway.store import notifications as store_notifications
from gateway.store.notifications import NotificationRow

NOTIFICATION_NOT_FOUND: Final = "No such notification."
_MAX_ID: Final = 2**63 - 1


def view(row: NotificationRow) -> NotificationView:
    return NotificationView(
        id=row.id,
        type=row.type,
        title=row.title,
        message=row.message,
        job_id=row.job_id,
        metadata=row.metadata,
        read=row.read_at is not None,
        read_at=row.read_at,
        created_at=row.created_at,
    )


async def list_notifications(request: web.Request) -> web.StreamResponse:
    principal = await authenticate(request)
    query = decode_query(dict(request.query), NotificationQuery)
    before = cursors.notification_key(query.cursor) if query.cursor else None
    async with get_database(request.app).connection() as conn:
        rows = await store_notifications.page(
            conn, principal.user_id, limit=query.limit + 1, before_id=before,
            unread_only=query.unread,
        )
        unread = await store_notifications.count_unread(conn, principal.user_id)
    page, more = rows[: query.limit], len(rows) > query.limit
    return respond(NotificationPage(
        notifications=[view(row) for row in page],
        unread_count=unread,
        next_cursor=cursors.encode(page[-1].id) if more else None,
    ))


async def mark_read(request: web.Request) -> web.StreamResponse:
    principal = await authenticate(request)
    raw = request.match_info["id"]
    # a malformed id is as absent as a missing one
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= _MAX_ID:
        raise NotFound(NOTIFICATION_NOT_FOUND)
    async with get_database(request.app).connection() as conn:
        row = await store_notifications.mark_read(conn, int(raw), principal.user_id)
    if row is None:
        raise NotFound(NOTIFICATION_NOT_FOUND)
    return respond(view(row))
