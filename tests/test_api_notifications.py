"""The caller's notifications: newest first, unread filter, cursor pages, idempotent read."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.jobs.records import FileRecord, JobUpdate
from gateway.jobs.state import Event, Status
from gateway.store import Database
from tests.factories import apply_update, insert_job, insert_notification
from tests.tokens import user


async def test_a_completed_job_notifies_its_owner(client: Any, db: Database) -> None:
    job_id = await insert_job(db)
    await apply_update(db, job_id, JobUpdate(
        Event(Status.COMPLETED), source="webhook",
        files=(FileRecord(url="https://cdn.example/1.png"),)))
    body = await (await client.get("/api/notifications", headers=user())).json()
    assert body["unread_count"] == 1
    assert body["next_cursor"] is None
    [note] = body["notifications"]
    assert (note["type"], note["job_id"], note["read"], note["read_at"]) == (
        "IMAGE_COMPLETED", job_id, False, None)
    assert note["title"] == "Images ready"
    assert note["message"] == "1 image(s) created."
    assert note["metadata"] == {"job_id": job_id, "kind": "image", "files": 1}


async def test_notifications_are_newest_first_in_cursor_pages(client: Any, db: Database) -> None:
    ids = [await insert_notification(db) for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        body = await (await client.get("/api/notifications", params=params,
                                        headers=user())).json()
        seen.append([n["id"] for n in body["notifications"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        await insert_notification(db)  # a new one between pages shifts nothing
    assert seen == [ids[4:2:-1], ids[2:0:-1], ids[0:1]]


async def test_unread_filter(client: Any, db: Database) -> None:
    unread = await insert_notification(db)
    await insert_notification(db, read=True)
    body = await (await client.get("/api/notifications", params={"unread": "true"},
                                   headers=user())).json()
    assert [n["id"] for n in body["notifications"]] == [unread]
    assert body["unread_count"] == 1
    everything = await (await client.get("/api/notifications", headers=user())).json()
    assert len(everything["notifications"]) == 2


async def test_mark_read_is_idempotent(client: Any, db: Database) -> None:
    note = await insert_notification(db)
    first = await client.post(f"/api/notifications/{note}/read", headers=user())
    again = await client.post(f"/api/notifications/{note}/read", headers=user())
    assert (first.status, again.status) == (200, 200)
    first_body, again_body = await first.json(), await again.json()
    assert first_body["read"] is True
    assert first_body["read_at"] is not None
    assert again_body == first_body  # read_at kept from the first call
    body = await (await client.get("/api/notifications", params={"unread": "1"},
                                   headers=user())).json()
    assert (body["notifications"], body["unread_count"]) == ([], 0)


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "99999999999999999999", "1.5"])
async def test_malformed_notification_id_is_404(client: Any, raw: str) -> None:
    resp = await client.post(f"/api/notifications/{raw}/read", headers=user())
    assert resp.status == 404


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": "101"}, "limit"), ({"unread": "maybe"}, "unread"), ({"cursor": "xyz"}, "cursor"),
], ids=["limit-over-100", "unread-not-boolean", "cursor-garbage"])
async def test_bad_notification_query_is_422_naming_it(
    client: Any, params: dict[str, str], field: str
) -> None:
    resp = await client.get("/api/notifications", params=params, headers=user())
    assert resp.status == 422
    assert (await resp.json())["field"] == field
