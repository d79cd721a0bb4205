"""The client API for jobs: create (validation, idempotency), status, result, gallery, cancel."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from gateway import metrics
from gateway.app import create_app
from gateway.jobs.kinds import Kind
from gateway.jobs.records import FileRecord, JobUpdate
from gateway.jobs.state import Event, Status
from gateway.settings import Settings
from gateway.store import Database
from tests.factories import apply_update, insert_job
from tests.tokens import hs256_token, user

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 64
GIF = b"GIF89a" + b"\x00" * 64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def create(client: Any, kind: str, body: Any, sub: str = "user_a",
                 headers: dict[str, str] | None = None) -> Any:
    # a stream, so that large bodies (an input image) do not block the test's loop
    return await client.post(f"/api/{kind}/generate", data=io.BytesIO(json.dumps(body).encode()),
                             headers={**user(sub), "Content-Type": "application/json",
                                      **(headers or {})})


async def count(db: Database, table: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return value


# --- create --------------------------------------------------------------------------------


async def test_image_job_and_its_outbox_row_are_committed_before_the_answer(
    client: Any, db: Database
) -> None:
    resp = await create(client, "images", {"prompt": "  a red fox   in the snow ",
                                           "num_images": 2, "quality": "high"})
    assert resp.status == 202
    body = await resp.json()
    assert body["status"] == "PENDING"
    assert body["message"]
    assert body["created_at"].endswith("Z")
    assert uuid.UUID(body["job_id"]).version == 4
    job = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", body["job_id"])
    assert job is not None
    assert (job["kind"], job["status"], job["user_id"]) == ("image", "PENDING", "user_a")
    assert job["prompt"] == "a red fox   in the snow"
    assert job["prompt_norm"] == "a red fox in the snow"
    assert job["params"] == {"num_images": 2, "size": "1024x1024", "format": "PNG",
                             "style": "photorealistic", "quality": "high"}
    outbox = await db.fetch("SELECT action, payload FROM outbox WHERE job_id = $1",
                            body["job_id"])
    assert [r["action"] for r in outbox] == ["generate"]
    assert outbox[0]["payload"] == {
        "prompt": "a red fox   in the snow", "num_images": 2, "size": "1024x1024",
        "format": "PNG", "style": "photorealistic", "quality": "high",
        "job_id": body["job_id"], "user_id": "user_a",
    }


async def test_video_job_gets_the_contract_defaults(client: Any, db: Database) -> None:
    resp = await create(client, "videos", {"prompt": "waves at dusk"})
    assert resp.status == 202
    job_id = (await resp.json())["job_id"]
    payload = await db.fetchval("SELECT payload FROM outbox WHERE job_id = $1", job_id)
    assert payload == {
        "prompt": "waves at dusk", "aspect_ratio": "16:9", "duration_seconds": 8,
        "number_of_videos": 1, "person_generation": "ALLOW_ALL",
        "job_id": job_id, "user_id": "user_a",
    }
    assert await db.fetchval("SELECT kind FROM jobs WHERE id = $1", job_id) == "video"


async def test_input_image_goes_to_the_backend_but_is_not_kept_on_the_job(
    client: Any, db: Database
) -> None:
    image = b64(PNG)
    resp = await create(client, "videos", {"prompt": "animate this", "input_image_base64": image})
    assert resp.status == 202
    job_id = (await resp.json())["job_id"]
    assert (await db.fetchval("SELECT payload FROM outbox WHERE job_id = $1", job_id))[
        "input_image_base64"] == image
    params = await db.fetchval("SELECT params FROM jobs WHERE id = $1", job_id)
    assert params["input_image"] is True
    assert "input_image_base64" not in params


@pytest.mark.parametrize("image", [
    pytest.param(b64(JPEG), id="jpeg"),
    pytest.param(b64(WEBP), id="webp"),
    pytest.param("data:image/png;base64," + b64(PNG), id="png-data-url"),
])
async def test_input_image_formats_accepted(client: Any, image: str) -> None:
    resp = await create(client, "videos", {"prompt": "p", "input_image_base64": image})
    assert resp.status == 202


async def test_org_id_claim_is_kept_on_the_job(client: Any, db: Database) -> None:
    resp = await client.post("/api/images/generate", json={"prompt": "p"},
                             headers=user("user_a", org_id="org_42"))
    job_id = (await resp.json())["job_id"]
    assert await db.fetchval("SELECT org_id FROM jobs WHERE id = $1", job_id) == "org_42"


async def test_jobs_created_are_counted_by_kind(client: Any) -> None:
    counter = metrics.JOBS_CREATED.labels(kind="video")
    before = counter._value.get()
    await create(client, "videos", {"prompt": "p"})
    await create(client, "videos", {"prompt": "p"}, headers={"Idempotency-Key": "k"})
    await create(client, "videos", {"prompt": "p"}, headers={"Idempotency-Key": "k"})
    assert counter._value.get() == before + 2


async def test_prompt_of_4000_characters_after_trimming_with_line_breaks_is_accepted(
    client: Any, db: Database
) -> None:
    prompt = ("line one\n\tline two " * 400)[:4000]
    resp = await create(client, "images", {"prompt": f"\n  {prompt}  \n"})
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["job_id"]
    assert await db.fetchval("SELECT prompt FROM jobs WHERE id = $1", job_id) == prompt.strip()


INVALID = [
    # (kind, body, status, field)
    ("images", {}, 422, "prompt"),
    ("images", {"prompt": "   \n "}, 422, "prompt"),
    ("images", {"prompt": "x" * 4001}, 422, "prompt"),
    ("images", {"prompt": "bell \x07 here"}, 422, "prompt"),
    ("images", {"prompt": "c1 \x85 control"}, 422, "prompt"),
    ("images", {"prompt": 42}, 422, "prompt"),
    ("images", {"prompt": "p", "num_images": 0}, 422, "num_images"),
    ("images", {"prompt": "p", "num_images": 5}, 422, "num_images"),
    ("images", {"prompt": "p", "num_images": "2"}, 422, "num_images"),
    ("images", {"prompt": "p", "size": "1024"}, 422, "size"),
    ("images", {"prompt": "p", "size": "255x1024"}, 422, "size"),
    ("images", {"prompt": "p", "size": "1024x4097"}, 422, "size"),
    ("images", {"prompt": "p", "format": "GIF"}, 422, "format"),
    ("images", {"prompt": "p", "quality": "ultra"}, 422, "quality"),
    ("images", {"prompt": "p", "style": ""}, 422, "style"),
    ("images", {"prompt": "p", "input_image_url": "http://cdn.example/a.png"}, 422,
     "input_image_url"),
    ("images", {"prompt": "p", "input_image_url": "file:///etc/passwd"}, 422,
     "input_image_url"),
    ("images", {"prompt": "p", "input_image_url": "https://user@internal/a.png"}, 422,
     "input_image_url"),
    ("videos", {"prompt": "p", "aspect_ratio": "4:3"}, 422, "aspect_ratio"),
    ("videos", {"prompt": "p", "duration_seconds": 4}, 422, "duration_seconds"),
    ("videos", {"prompt": "p", "duration_seconds": 9}, 422, "duration_seconds"),
    ("videos", {"prompt": "p", "number_of_videos": 0}, 422, "number_of_videos"),
    ("videos", {"prompt": "p", "number_of_videos": 5}, 422, "number_of_videos"),
    ("videos", {"prompt": "p", "person_generation": "SOMETIMES"}, 422, "person_generation"),
    ("videos", {"prompt": "p", "input_image_base64": "not base64!"}, 422,
     "input_image_base64"),
    ("videos", {"prompt": "p", "input_image_base64": b64(GIF)}, 422, "input_image_base64"),
    ("videos", {"prompt": "p", "input_image_base64": b64(PNG + b"\x00" * (10 * 1024 * 1024))},
     413, "input_image_base64"),
    ("videos", [{"prompt": "p"}], 422, "body"),
]
INVALID_IDS = [
    "missing-prompt", "blank-prompt", "prompt-over-4000", "prompt-c0-control",
    "prompt-c1-control", "prompt-not-text", "num_images-0", "num_images-5",
    "num_images-string", "size-no-x", "size-side-below-256", "size-side-over-4096",
    "format-gif", "quality-unknown", "style-empty", "input_image_url-http",
    "input_image_url-file", "input_image_url-userinfo", "aspect_ratio-4-3",
    "duration-4", "duration-9", "videos-0", "videos-5", "person_generation-unknown",
    "input_image-not-base64", "input_image-gif", "input_image-over-10MiB", "body-not-object",
]


@pytest.mark.parametrize(("kind", "body", "status", "field"), INVALID, ids=INVALID_IDS)
async def test_invalid_field_is_refused_naming_it_and_nothing_is_written(
    client: Any, db: Database, kind: str, body: Any, status: int, field: str
) -> None:
    resp = await create(client, kind, body)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["field"] == field
    assert field in problem["detail"]
    assert await count(db, "jobs") == 0
    assert await count(db, "outbox") == 0


async def test_pattern_failures_say_what_is_expected(client: Any) -> None:
    resp = await create(client, "images", {"prompt": "p", "size": "big"})
    assert (await resp.json())["detail"] == "size: must be WIDTHxHEIGHT, e.g. 1024x1024"


async def test_body_that_is_not_json_is_400(client: Any, db: Database) -> None:
    resp = await client.post("/api/images/generate", data=b"prompt=a cat",
                             headers=user("user_a"))
    assert resp.status == 400
    assert await count(db, "jobs") == 0


async def test_body_over_the_request_limit_is_413(
    make_settings: Callable[..., Settings], db: Database, aiohttp_client: Callable[..., Any]
) -> None:
    client = await aiohttp_client(create_app(make_settings(request_max_body_bytes=4096)))
    resp = await create(client, "images", {"prompt": "x" * 5000})
    assert resp.status == 413
    assert await count(db, "jobs") == 0


async def test_unauthenticated_create_writes_nothing(client: Any, db: Database) -> None:
    resp = await client.post("/api/images/generate", json={"prompt": "p"})
    assert resp.status == 401
    assert await count(db, "jobs") == 0


# --- idempotency ---------------------------------------------------------------------------


async def test_same_idempotency_key_and_body_returns_the_same_job(
    client: Any, db: Database
) -> None:
    key = {"Idempotency-Key": "create-7f3a"}
    first = await create(client, "images", {"prompt": "a cat", "num_images": 1}, headers=key)
    # the same request, written differently: defaults spelled out, prompt padded
    again = await create(client, "images", {"prompt": " a cat ", "size": "1024x1024"},
                         headers=key)
    assert (first.status, again.status) == (202, 202)
    assert (await first.json())["job_id"] == (await again.json())["job_id"]
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await count(db, "jobs") == 1
    assert await count(db, "outbox") == 1


async def test_same_idempotency_key_with_another_body_is_422(client: Any, db: Database) -> None:
    key = {"Idempotency-Key": "create-7f3a"}
    assert (await create(client, "images", {"prompt": "a cat"}, headers=key)).status == 202
    resp = await create(client, "images", {"prompt": "a dog"}, headers=key)
    assert resp.status == 422
    assert (await resp.json())["field"] == "Idempotency-Key"
    assert await count(db, "jobs") == 1


async def test_idempotency_keys_are_per_user_and_per_kind(client: Any, db: Database) -> None:
    key = {"Idempotency-Key": "shared-key"}
    ids = {
        (await (await create(client, "images", {"prompt": "p"}, "user_a", key)).json())["job_id"],
        (await (await create(client, "images", {"prompt": "p"}, "user_b", key)).json())["job_id"],
        (await (await create(client, "videos", {"prompt": "p"}, "user_a", key)).json())["job_id"],
    }
    assert len(ids) == 3
    assert await count(db, "jobs") == 3


async def test_concurrent_creates_with_one_key_make_one_job(client: Any, db: Database) -> None:
    key = {"Idempotency-Key": "double-click"}
    answers = await asyncio.gather(*(
        create(client, "videos", {"prompt": "a storm"}, headers=key) for _ in range(8)
    ))
    assert [r.status for r in answers] == [202] * 8
    assert len({(await r.json())["job_id"] for r in answers}) == 1
    assert await count(db, "jobs") == 1
    assert await count(db, "outbox") == 1


@pytest.mark.parametrize("key", ["has space", "", "k" * 256, "caf\u00e9"],
                         ids=["space", "empty", "too-long", "non-ascii"])
async def test_malformed_idempotency_key_is_422(client: Any, key: str) -> None:
    resp = await client.post("/api/images/generate", json={"prompt": "p"},
                             headers={**user(), "Idempotency-Key": key})
    assert resp.status == 422
    assert (await resp.json())["field"] == "Idempotency-Key"


# --- status and result ---------------------------------------------------------------------


async def test_status_follows_the_job(client: Any, db: Database) -> None:
    job_id = (await (await create(client, "images", {"prompt": "p"})).json())["job_id"]
    first = await (await client.get(f"/api/images/{job_id}/status", headers=user())).json()
    assert (first["job_id"], first["status"], first["progress"]) == (job_id, "PENDING", 0)
    await apply_update(db, job_id, JobUpdate(Event(Status.GENERATING, 40), source="webhook",
                                             message="Generating"))
    resp = await client.get(f"/api/images/{job_id}/status", headers=user())
    body = await resp.json()
    assert (body["status"], body["progress"], body["message"]) == ("GENERATING", 40, "Generating")
    assert body["updated_at"] > first["updated_at"]


async def test_status_of_a_failed_job_carries_the_error(client: Any, db: Database) -> None:
    job_id = await insert_job(db, kind=Kind.VIDEO)
    await apply_update(db, job_id, JobUpdate(Event(Status.FAILED), source="webhook",
                                             message="failed", error_message="Quota exceeded"))
    body = await (await client.get(f"/api/videos/{job_id}/status", headers=user())).json()
    assert (body["status"], body["message"]) == ("FAILED", "Quota exceeded")


IMAGES = (
    FileRecord(url="https://cdn.example/1.png", format="PNG", size_bytes=524288, width=1024,
               height=1024, storage_key="images/x/image_1.png"),
    FileRecord(url="https://cdn.example/2.png", format="PNG", size_bytes=524289, width=1024,
               height=768),
)


async def test_result_lists_the_files_and_metadata(client: Any, db: Database) -> None:
    job_id = await insert_job(db, prompt="two foxes")
    await apply_update(db, job_id, JobUpdate(
        Event(Status.COMPLETED, 100), source="webhook", files=IMAGES,
        model_name="gemini-2.5-flash-image", generation_time_seconds=12.5))
    body = await (await client.get(f"/api/images/{job_id}/result", headers=user())).json()
    assert body["job_id"] == job_id
    assert body["status"] == "COMPLETED"
    assert body["images"] == [
        {"url": "https://cdn.example/1.png", "format": "PNG", "size_bytes": 524288,
         "width": 1024, "height": 1024},
        {"url": "https://cdn.example/2.png", "format": "PNG", "size_bytes": 524289,
         "width": 1024, "height": 768},
    ]
    assert body["metadata"]["model_name"] == "gemini-2.5-flash-image"
    assert body["metadata"]["generation_time_seconds"] == 12.5
    assert body["metadata"]["prompt"] == "two foxes"
    assert body["metadata"]["finished_at"] is not None


async def test_video_result_has_durations(client: Any, db: Database) -> None:
    job_id = await insert_job(db, kind=Kind.VIDEO)
    await apply_update(db, job_id, JobUpdate(
        Event(Status.COMPLETED), source="webhook",
        files=(FileRecord(url="https://cdn.example/v.mp4", format="MP4", size_bytes=9,
                          width=1280, height=720, duration_seconds=8.0),)))
    body = await (await client.get(f"/api/videos/{job_id}/result", headers=user())).json()
    assert body["videos"] == [{"url": "https://cdn.example/v.mp4", "format": "MP4",
                               "size_bytes": 9, "width": 1280, "height": 720,
                               "duration_seconds": 8.0}]
    assert "images" not in body


async def test_result_before_completion_has_no_files(client: Any, db: Database) -> None:
    job_id = await insert_job(db, status=Status.GENERATING)
    body = await (await client.get(f"/api/images/{job_id}/result", headers=user())).json()
    assert (body["status"], body["images"]) == ("GENERATING", [])


# --- gallery -------------------------------------------------------------------------------


async def gallery_pages(client: Any, kind: str, limit: int, sub: str = "user_a") -> list[list[str]]:
    pages, cursor = [], None
    while True:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        resp = await client.get(f"/api/{kind}/user", params=params, headers=user(sub))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        pages.append([g["job_id"] for g in body["generations"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


async def test_gallery_is_newest_first_with_files(client: Any, db: Database) -> None:
    old = await insert_job(db, created_ago_seconds=60)
    new = await insert_job(db, created_ago_seconds=1)
    await insert_job(db, kind=Kind.VIDEO)
    await insert_job(db, user_id="user_b")
    await apply_update(db, old, JobUpdate(Event(Status.COMPLETED), source="webhook",
                                          files=IMAGES))
    body = await (await client.get("/api/images/user", headers=user())).json()
    assert [g["job_id"] for g in body["generations"]] == [new, old]
    assert body["next_cursor"] is None
    assert [f["url"] for f in body["generations"][1]["images"]] == [f.url for f in IMAGES]
    assert body["generations"][0]["images"] == []
    assert body["generations"][1]["prompt"] == "a cat in sunglasses"


async def test_gallery_pages_cover_every_job_once_including_equal_timestamps(
    client: Any, db: Database
) -> None:
    ids = [await insert_job(db, created_ago_seconds=100 - n) for n in range(5)]
    same = [str(uuid.uuid4()) for _ in range(3)]
    await db.execute(
        "INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, created_at) "
        "SELECT id, 'image', 'user_a', 'p', 'p', now() - interval '50 seconds' "
        "FROM unnest($1::text[]) AS id", same)
    pages = await gallery_pages(client, "images", limit=3)
    assert [len(p) for p in pages] == [3, 3, 2]
    seen = [job_id for page in pages for job_id in page]
    # the three of one instant first (newest), in id order, then the older ones
    assert seen == sorted(same, reverse=True) + ids[::-1]


async def test_gallery_pagination_is_stable_while_jobs_are_created(
    client: Any, db: Database
) -> None:
    ids = [await insert_job(db, created_ago_seconds=100 - n) for n in range(6)]
    newest_first = ids[::-1]
    first = await (await client.get("/api/images/user", params={"limit": "2"},
                                    headers=user())).json()
    assert [g["job_id"] for g in first["generations"]] == newest_first[:2]
    for _ in range(3):  # new jobs arrive between pages
        assert (await create(client, "images", {"prompt": "new"})).status == 202
    second = await (await client.get("/api/images/user",
                                     params={"limit": "2", "cursor": first["next_cursor"]},
                                     headers=user())).json()
    assert [g["job_id"] for g in second["generations"]] == newest_first[2:4]
    third = await (await client.get("/api/images/user",
                                    params={"limit": "2", "cursor": second["next_cursor"]},
                                    headers=user())).json()
    assert [g["job_id"] for g in third["generations"]] == newest_first[4:6]
    assert third["next_cursor"] is None


async def test_gallery_default_limit_is_20(client: Any, db: Database) -> None:
    for n in range(21):
        await insert_job(db, created_ago_seconds=n)
    body = await (await client.get("/api/images/user", headers=user())).json()
    assert len(body["generations"]) == 20
    assert body["next_cursor"] is not None


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": "101"}, "limit"), ({"limit": "0"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"), ({"cursor": "%%%"}, "cursor"),
], ids=["limit-over-100", "limit-0", "limit-not-a-number", "cursor-forged", "cursor-garbage"])
async def test_bad_gallery_query_is_422_naming_it(
    client: Any, params: dict[str, str], field: str
) -> None:
    resp = await client.get("/api/videos/user", params=params, headers=user())
    assert resp.status == 422
    assert (await resp.json())["field"] == field


# --- cancel --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [Status.PENDING, Status.QUEUED, Status.GENERATING])
async def test_cancel_of_an_unfinished_job_cancels_it_and_queues_a_backend_cancel(
    client: Any, db: Database, status: Status
) -> None:
    job_id = await insert_job(db, status=status, progress=30)
    resp = await client.post(f"/api/images/{job_id}/cancel", headers=user())
    assert resp.status == 200
    body = await resp.json()
    assert (body["job_id"], body["status"], body["progress"]) == (job_id, "CANCELLED", 30)
    row = await db.fetchrow("SELECT status, finished_at FROM jobs WHERE id = $1", job_id)
    assert row is not None
    assert row["status"] == "CANCELLED"
    assert row["finished_at"] is not None
    outbox = await db.fetch("SELECT action, payload FROM outbox WHERE job_id = $1", job_id)
    assert [(r["action"], r["payload"]) for r in outbox] == [
        ("cancel", {"job_id": job_id, "user_id": "user_a"})]
    sources = await db.fetch("SELECT status, source FROM job_events WHERE job_id = $1", job_id)
    assert [(e["status"], e["source"]) for e in sources] == [("CANCELLED", "cancel")]
    assert await count(db, "notifications") == 0  # the user did it themselves


@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED, Status.CANCELLED,
                                    Status.TIMED_OUT])
async def test_cancel_of_a_finished_job_is_409_and_changes_nothing(
    client: Any, db: Database, status: Status
) -> None:
    job_id = await insert_job(db, kind=Kind.VIDEO, status=status)
    resp = await client.post(f"/api/videos/{job_id}/cancel", headers=user())
    assert resp.status == 409
    assert resp.content_type == "application/problem+json"
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == status.value
    assert await count(db, "outbox") == 0
    assert await count(db, "job_events") == 0


async def test_second_cancel_is_409(client: Any, db: Database) -> None:
    job_id = (await (await create(client, "images", {"prompt": "p"})).json())["job_id"]
    assert (await client.post(f"/api/images/{job_id}/cancel", headers=user())).status == 200
    assert (await client.post(f"/api/images/{job_id}/cancel", headers=user())).status == 409
    actions = await db.fetch("SELECT action FROM outbox WHERE job_id = $1 ORDER BY id", job_id)
    assert [r["action"] for r in actions] == ["generate", "cancel"]


async def test_created_job_is_readable_with_a_token_of_the_same_subject(client: Any) -> None:
    job_id = (await (await create(client, "images", {"prompt": "p"})).json())["job_id"]
    other_token = {"Authorization": f"Bearer {hs256_token('user_a', ttl=60)}"}
    assert (await client.get(f"/api/images/{job_id}/status", headers=other_token)).status == 200

