"""Per-user limits on creating jobs: refusals, their headers, idempotent replays, overrides."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient

from gateway import metrics
from gateway.app import create_app
from gateway.jobs.limits import Override
from gateway.jobs.state import Status
from gateway.settings import Settings
from gateway.store import Database
from gateway.store import limits as store_limits
from tests.factories import insert_job
from tests.test_api_jobs import create
from tests.tokens import user

IMAGE = {"prompt": "a lighthouse at dusk"}
VIDEO = {"prompt": "waves against a lighthouse"}


async def limited_client(
    make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any], **limits: int
) -> TestClient[Any, Any]:
    off = dict(user_max_active_image_jobs=0, user_max_active_video_jobs=0,
               user_max_image_jobs_per_hour=0, user_max_video_jobs_per_hour=0)
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(make_settings(**{**off, **limits}))
    )
    return client


async def jobs_of(db: Database, user_id: str) -> int:
    value: int = await db.fetchval("SELECT count(*) FROM jobs WHERE user_id = $1", user_id)
    return value


async def test_a_create_over_the_active_limit_is_429_naming_it_and_writes_nothing(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=2)
    before = metrics.CREATES_REFUSED.labels(
        kind="image", limit="USER_MAX_ACTIVE_IMAGE_JOBS")._value.get()
    for _ in range(2):
        assert (await create(client, "images", IMAGE)).status == 202
    outbox_rows = await db.fetchval("SELECT count(*) FROM outbox")

    resp = await create(client, "images", IMAGE)
    assert resp.status == 429
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["limit"] == "USER_MAX_ACTIVE_IMAGE_JOBS"
    assert body["value"] == 2
    assert "USER_MAX_ACTIVE_IMAGE_JOBS" in body["detail"]
    assert resp.headers["Retry-After"] == "5"
    assert resp.headers["RateLimit-Policy"] == '"images-active";q=2'
    assert resp.headers["RateLimit"] == '"images-active";r=0'
    assert await jobs_of(db, "user_a") == 2
    assert await db.fetchval("SELECT count(*) FROM outbox") == outbox_rows
    assert metrics.CREATES_REFUSED.labels(
        kind="image", limit="USER_MAX_ACTIVE_IMAGE_JOBS")._value.get() == before + 1

    # the other kind and the other user have their own counts
    assert (await create(client, "videos", VIDEO)).status == 202
    assert (await create(client, "images", IMAGE, sub="user_b")).status == 202


async def test_a_terminal_job_frees_its_place_under_the_active_limit(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=1)
    first = await (await create(client, "images", IMAGE)).json()
    assert (await create(client, "images", IMAGE)).status == 429
    assert (await client.post(f"/api/images/{first['job_id']}/cancel",
                              headers=user("user_a"))).status == 200
    assert (await create(client, "images", IMAGE)).status == 202


async def test_every_status_but_the_terminal_ones_counts_toward_the_active_limit(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    # the create's SQL names the terminal statuses: they must be the state machine's
    for status in Status:
        await insert_job(db, status=status)
    active = [s for s in Status if not s.terminal]
    client = await limited_client(make_settings, aiohttp_client,
                                  user_max_active_image_jobs=len(active) + 1)
    accepted = await create(client, "images", IMAGE)
    assert accepted.status == 202
    assert accepted.headers["RateLimit"] == '"images-active";r=0'
    assert (await create(client, "images", IMAGE)).status == 429


async def test_a_user_far_over_a_lowered_limit_is_refused_with_the_usage_at_the_limit(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    for _ in range(12):
        await insert_job(db, status=Status.GENERATING)
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=3,
                                  user_max_image_jobs_per_hour=5)
    refused = await create(client, "images", IMAGE)
    assert refused.status == 429
    assert (await refused.json())["limit"] == "USER_MAX_ACTIVE_IMAGE_JOBS"
    hour, active = refused.headers["RateLimit"].split(", ")
    assert hour.startswith('"images-hour";r=0;t=')
    assert active == '"images-active";r=0'
    assert await jobs_of(db, "user_a") == 12


def _remaining(resp: Any) -> dict[str, int]:
    """The r= of each RateLimit field, by policy name."""
    states = (field.split(";") for field in resp.headers["RateLimit"].split(", "))
    return {name.strip('"'): int(dict(p.split("=") for p in params)["r"])
            for name, *params in states}


async def test_the_usage_follows_every_change_made_after_a_users_first_create(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=100,
                                  user_max_image_jobs_per_hour=100)
    first = await create(client, "images", IMAGE)
    assert _remaining(first) == {"images-hour": 99, "images-active": 99}
    leaving = await write_past_the_create(db)
    await two_more_creates_count_them(client)
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE id = $1", leaving) == 1


async def write_past_the_create(db: Database) -> str:
    """Jobs of user_a written by others than a create: one in every status, one ending, one
    created long ago, and one created 3,598 s ago (returned), about to leave the window."""
    for status in Status:
        await insert_job(db, status=status)
    ending = await insert_job(db, status=Status.GENERATING)
    await db.execute("UPDATE jobs SET status = 'FAILED' WHERE id = $1", ending)
    await insert_job(db, status=Status.COMPLETED, created_ago_seconds=7200)
    return await insert_job(db, status=Status.COMPLETED, created_ago_seconds=3598)


async def two_more_creates_count_them(client: TestClient[Any, Any]) -> None:
    """After one create and write_past_the_create, with both image limits at 100: the next
    create counts every job written, and one 2.5 s later no longer the one leaving."""
    second = await create(client, "images", IMAGE)
    active = 1 + sum(not s.terminal for s in Status)
    in_window = 1 + len(Status) + 1 + 1
    assert _remaining(second) == {"images-hour": 100 - in_window - 1,
                                  "images-active": 100 - active - 1}
    await asyncio.sleep(2.5)
    third = await create(client, "images", IMAGE)
    assert _remaining(third) == {"images-hour": 100 - in_window - 1,
                                 "images-active": 100 - active - 2}


async def test_the_hourly_limit_retries_when_the_oldest_counted_creation_leaves_the_window(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client,
                                  user_max_image_jobs_per_hour=3)
    # finished jobs count against the hourly limit; one older than an hour does not
    await insert_job(db, created_ago_seconds=3700, status=Status.COMPLETED)
    await insert_job(db, created_ago_seconds=1800, status=Status.COMPLETED)
    await insert_job(db, created_ago_seconds=600, status=Status.COMPLETED)
    accepted = await create(client, "images", IMAGE)
    assert accepted.status == 202
    assert accepted.headers["RateLimit-Policy"] == '"images-hour";q=3;w=3600'
    remaining, reset = _state(accepted.headers["RateLimit"])
    assert remaining == 0
    assert 1790 <= reset <= 1800

    refused = await create(client, "images", IMAGE)
    assert refused.status == 429
    body = await refused.json()
    assert (body["limit"], body["value"]) == ("USER_MAX_IMAGE_JOBS_PER_HOUR", 3)
    # the creation 30 minutes ago leaves the window in 30 minutes
    assert 1790 <= int(refused.headers["Retry-After"]) <= 1800
    assert await jobs_of(db, "user_a") == 4


async def test_a_lowered_hourly_limit_waits_for_as_many_creations_as_it_is_over(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client,
                                  user_max_image_jobs_per_hour=2)
    for ago in (3000, 2000, 1000):
        await insert_job(db, created_ago_seconds=ago, status=Status.COMPLETED)
    refused = await create(client, "images", IMAGE)
    assert refused.status == 429
    # two of the three must leave: the one created 2000 s ago leaves last, in 1600 s
    assert 1590 <= int(refused.headers["Retry-After"]) <= 1600


def _state(field: str) -> tuple[int, int]:
    params = dict(p.split("=") for p in field.split(";")[1:])
    return int(params["r"]), int(params["t"])


async def test_an_idempotent_replay_of_an_accepted_create_is_never_refused(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=1,
                                  user_max_image_jobs_per_hour=1)
    key = {"Idempotency-Key": "order-1"}
    first = await create(client, "images", IMAGE, headers=key)
    assert first.status == 202
    again = await create(client, "images", IMAGE, headers=key)
    assert again.status == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["job_id"] == (await first.json())["job_id"]
    assert "RateLimit" in again.headers
    # a new key is a new job, and that one is over the limit
    assert (await create(client, "images", IMAGE, headers={"Idempotency-Key": "o-2"})).status \
        == 429
    # a reused key with another body stays a 422, not a 429
    other = await create(client, "images", {"prompt": "other"}, headers=key)
    assert other.status == 422


async def test_limits_off_add_no_ratelimit_fields(
    make_settings: Callable[..., Settings], aiohttp_client: Any
) -> None:
    client = await limited_client(make_settings, aiohttp_client)
    resp = await create(client, "images", IMAGE)
    assert resp.status == 202
    assert "RateLimit" not in resp.headers
    assert "RateLimit-Policy" not in resp.headers


async def test_every_accepted_create_states_both_limits(
    make_settings: Callable[..., Settings], aiohttp_client: Any
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_video_jobs=3,
                                  user_max_video_jobs_per_hour=20)
    resp = await create(client, "videos", VIDEO)
    assert resp.headers["RateLimit-Policy"] == '"videos-hour";q=20;w=3600, "videos-active";q=3'
    hour, active = resp.headers["RateLimit"].split(", ")
    assert hour.startswith('"videos-hour";r=19;t=')
    assert 3595 <= int(hour.rsplit("=", 1)[1]) <= 3600
    assert active == '"videos-active";r=2'


async def test_concurrent_creates_of_one_user_admit_exactly_the_limit(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=4)
    answers = await asyncio.gather(*(create(client, "images", IMAGE) for _ in range(30)))
    statuses = sorted(r.status for r in answers)
    assert statuses.count(202) == 4
    assert statuses.count(429) == 26
    assert await jobs_of(db, "user_a") == 4


async def test_an_override_applies_at_the_next_request_and_a_reset_restores_the_default(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=1)
    assert (await create(client, "images", IMAGE)).status == 202
    assert (await create(client, "images", IMAGE)).status == 429
    async with db.transaction() as conn:
        await store_limits.set_override(conn, "user_a", Override(active_images=3), "ops")
    assert (await create(client, "images", IMAGE)).status == 202
    # 0 in an override turns the limit off for that user
    async with db.transaction() as conn:
        await store_limits.set_override(conn, "user_a", Override(active_images=0), "ops")
    assert (await create(client, "images", IMAGE)).status == 202
    assert (await create(client, "images", IMAGE)).status == 202
    async with db.transaction() as conn:
        assert await store_limits.reset_override(conn, "user_a", "ops")
    assert (await create(client, "images", IMAGE)).status == 429
    changes = await db.fetch(
        "SELECT action, limits, changed_by FROM user_limit_changes ORDER BY id")
    assert [(c["action"], c["changed_by"]) for c in changes] == [
        ("set", "ops"), ("set", "ops"), ("reset", "ops")]
    assert changes[1]["limits"]["active_images"] == 0


async def test_setting_one_limit_keeps_the_others_of_the_override(db: Database) -> None:
    async with db.transaction() as conn:
        await store_limits.set_override(conn, "u", Override(active_images=4), "ops")
        stored = await store_limits.set_override(conn, "u", Override(videos_per_hour=7), "ann")
    assert stored.override == Override(active_images=4, videos_per_hour=7)
    assert stored.set_by == "ann"
    assert stored.set_at <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    async with db.connection() as conn:
        assert await store_limits.reset_override(conn, "nobody", "ops") is False


async def test_the_openapi_document_declares_the_429_of_both_create_routes(
    client: Any,
) -> None:
    document = await (await client.get("/openapi.json")).json()
    for kind in ("images", "videos"):
        responses = document["paths"][f"/api/{kind}/generate"]["post"]["responses"]
        assert set(responses["429"]["headers"]) == {"Retry-After", "RateLimit-Policy",
                                                    "RateLimit"}
        assert {"RateLimit-Policy", "RateLimit"} <= set(responses["202"]["headers"])


async def test_an_override_applies_when_the_defaults_are_off(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database
) -> None:
    client = await limited_client(make_settings, aiohttp_client)
    async with db.transaction() as conn:
        await store_limits.set_override(conn, "user_a", Override(active_images=1), "ops")
    first = await create(client, "images", IMAGE)
    assert first.headers["RateLimit-Policy"] == '"images-active";q=1'
    assert (await create(client, "images", IMAGE)).status == 429
    # the override names images only: videos stay unlimited
    assert (await create(client, "videos", VIDEO)).status == 202
    assert (await create(client, "videos", VIDEO)).status == 202
    assert (await create(client, "images", IMAGE, sub="user_b")).status == 202
