"""A user never sees another user's job, result, gallery entry, notification or event stream:
anyone else's id answers exactly like an id that does not exist, and changes nothing."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from gateway.jobs.kinds import Kind
from gateway.jobs.records import FileRecord, JobUpdate
from gateway.jobs.state import Event, Status
from gateway.store import Database
from tests.factories import apply_update, insert_job, insert_notification
from tests.tokens import user

ME, THEM = "user_a", "user_b"


async def assert_same_as_missing(client: Any, method: str, path: str, missing: str) -> None:
    """`path` answers the caller exactly as `missing` (an id that exists nowhere) does."""
    theirs = await client.request(method, path, headers=user(ME))
    absent = await client.request(method, missing, headers=user(ME))
    assert theirs.status == absent.status == 404
    assert theirs.content_type == absent.content_type == "application/problem+json"
    assert await theirs.read() == await absent.read()


async def their_completed_job(db: Database, kind: Kind) -> str:
    job_id = await insert_job(db, kind=kind, user_id=THEM, status=Status.GENERATING)
    await apply_update(db, job_id, JobUpdate(
        Event(Status.COMPLETED), source="webhook",
        files=(FileRecord(url=f"https://cdn.example/{THEM}.bin"),)))
    return job_id


@pytest.mark.parametrize("kind", [Kind.IMAGE, Kind.VIDEO])
async def test_another_users_job_status_is_404_like_a_missing_one(
    client: Any, db: Database, kind: Kind
) -> None:
    job_id = await insert_job(db, kind=kind, user_id=THEM)
    await assert_same_as_missing(client, "GET", f"/api/{kind.plural}/{job_id}/status",
                                 f"/api/{kind.plural}/{uuid.uuid4()}/status")


@pytest.mark.parametrize("kind", [Kind.IMAGE, Kind.VIDEO])
async def test_another_users_result_is_404_like_a_missing_one(
    client: Any, db: Database, kind: Kind
) -> None:
    job_id = await their_completed_job(db, kind)
    await assert_same_as_missing(client, "GET", f"/api/{kind.plural}/{job_id}/result",
                                 f"/api/{kind.plural}/{uuid.uuid4()}/result")


@pytest.mark.parametrize("kind", [Kind.IMAGE, Kind.VIDEO])
async def test_another_users_job_cannot_be_cancelled_and_is_404(
    client: Any, db: Database, kind: Kind
) -> None:
    job_id = await insert_job(db, kind=kind, user_id=THEM, status=Status.GENERATING)
    await assert_same_as_missing(client, "POST", f"/api/{kind.plural}/{job_id}/cancel",
                                 f"/api/{kind.plural}/{uuid.uuid4()}/cancel")
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "GENERATING"
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


@pytest.mark.parametrize("kind", [Kind.IMAGE, Kind.VIDEO])
async def test_another_users_jobs_are_not_in_the_gallery(
    client: Any, db: Database, kind: Kind
) -> None:
    mine = await insert_job(db, kind=kind, user_id=ME, created_ago_seconds=30)
    theirs = {await their_completed_job(db, kind), await their_completed_job(db, kind)}
    body = await (await client.get(f"/api/{kind.plural}/user", headers=user(ME))).json()
    assert [g["job_id"] for g in body["generations"]] == [mine]
    # a cursor taken from their listing only positions the caller's own listing
    their_page = await (await client.get(f"/api/{kind.plural}/user", params={"limit": "1"},
                                         headers=user(THEM))).json()
    assert their_page["next_cursor"] is not None
    with_their_cursor = await (await client.get(
        f"/api/{kind.plural}/user", params={"cursor": their_page["next_cursor"]},
        headers=user(ME))).json()
    assert [g["job_id"] for g in with_their_cursor["generations"]] == [mine]
    assert not theirs & {g["job_id"] for g in with_their_cursor["generations"]}


async def test_another_users_event_stream_is_404_like_a_missing_one(
    client: Any, db: Database
) -> None:
    job_id = await insert_job(db, user_id=THEM, status=Status.GENERATING)
    await assert_same_as_missing(client, "GET", f"/api/jobs/{job_id}/events",
                                 f"/api/jobs/{uuid.uuid4()}/events")


async def test_another_users_notifications_are_not_listed(client: Any, db: Database) -> None:
    mine = await insert_notification(db, user_id=ME)
    await insert_notification(db, user_id=THEM)
    body = await (await client.get("/api/notifications", headers=user(ME))).json()
    assert [n["id"] for n in body["notifications"]] == [mine]
    assert body["unread_count"] == 1


async def test_another_users_notification_cannot_be_read_and_is_404(
    client: Any, db: Database
) -> None:
    theirs = await insert_notification(db, user_id=THEM)
    await assert_same_as_missing(client, "POST", f"/api/notifications/{theirs}/read",
                                 f"/api/notifications/{theirs + 1000}/read")
    assert await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", theirs) is None


@pytest.mark.parametrize("action", [("GET", "status"), ("GET", "result"), ("POST", "cancel")])
async def test_a_job_of_the_other_kind_is_404_like_a_missing_one(
    client: Any, db: Database, action: tuple[str, str]
) -> None:
    method, route = action
    image_job = await insert_job(db, kind=Kind.IMAGE, user_id=ME, status=Status.GENERATING)
    await assert_same_as_missing(client, method, f"/api/videos/{image_job}/{route}",
                                 f"/api/videos/{uuid.uuid4()}/{route}")
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", image_job) == "GENERATING"
