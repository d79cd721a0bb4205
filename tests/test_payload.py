"""The backend's webhook payload (seeds/004) and what it means for a job."""

from __future__ import annotations

import json

import pytest

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import PayloadError, decode, parse_dimensions
from gateway.jobs.state import Status

SEED_COMPLETED = {
    "job_id": "cm4abc123def456ghi789",
    "status": "completed",
    "timestamp": "2025-10-23T14:30:00.000Z",
    "environment": "development",
    "data": {
        "job_id": "cm4abc123def456ghi789",
        "images": [{
            "file_path": "images/cm4abc123def456ghi789/image_1.png",
            "url": "https://s3.amazonaws.com/bucket/image_1.png",
            "description": "Un chat mignon avec des lunettes de soleil",
            "format": "png",
            "size_bytes": 524288,
            "dimensions": "1024x1024",
        }],
        "metadata": {"model_name": "gemini-2.5-flash-image", "version": "1.0",
                     "generation_time_seconds": 12.5, "input_tokens": 50},
        "status": "completed",
        "generated_at": "2025-10-23T14:30:00.000Z",
    },
}


def test_the_seed_completion_maps_to_files_and_metadata() -> None:
    payload = decode(json.dumps(SEED_COMPLETED).encode())
    update = payload.to_update(Kind.IMAGE)
    assert update.event.status is Status.COMPLETED
    (f,) = update.files
    assert (f.storage_key, f.filename, f.format, f.width, f.height, f.size_bytes) == (
        "images/cm4abc123def456ghi789/image_1.png", "image_1.png", "PNG", 1024, 1024, 524288)
    assert update.model_name == "gemini-2.5-flash-image"
    assert update.generation_time_seconds == 12.5
    assert payload.hinted_prompt(Kind.IMAGE) == "Un chat mignon avec des lunettes de soleil"
    assert payload.hinted_user_id is None


def test_original_prompt_wins_over_descriptions() -> None:
    body = {**SEED_COMPLETED, "original_prompt": "a cat", "user_id": "user_2abc"}
    payload = decode(json.dumps(body).encode())
    assert payload.hinted_prompt(Kind.IMAGE) == "a cat"
    assert payload.hinted_user_id == "user_2abc"


def test_video_files_keep_their_duration() -> None:
    body = {"job_id": "v1", "status": "completed", "data": {"videos": [
        {"url": "https://cdn/v.mp4", "format": "MP4", "size_bytes": 1,
         "duration_seconds": 8.0, "dimensions": "1280x720"}]}}
    (f,) = decode(json.dumps(body).encode()).to_update(Kind.VIDEO).files
    assert (f.duration_seconds, f.width, f.height) == (8.0, 1280, 720)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "completed"}, "$.job_id"),
        ({"job_id": "x", "status": "exploded"}, "$.status"),
        ({"job_id": "x", "status": "generating", "progress": 250}, "$.progress"),
        ({"job_id": "x", "status": "completed", "data": {"images": [{"format": "PNG"}]}},
         "$.data.images[0].url"),
        ({"job_id": "x", "status": "failed", "error_message": "bad\u0000byte"},
         "$.error_message"),
        ({"job_id": 12, "status": "completed"}, "$.job_id"),
    ],
)
def test_wrong_shapes_name_the_field(body: dict[str, object], field: str | None) -> None:
    with pytest.raises(PayloadError) as raised:
        decode(json.dumps(body).encode())
    assert not raised.value.not_json
    assert raised.value.field == field


def test_deep_nesting_is_a_shape_error_not_a_crash() -> None:
    body = b'{"job_id": "x", "status": "completed", "extra": ' + b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(PayloadError) as raised:
        decode(body + b"}")
    assert not raised.value.not_json


def test_not_json_is_told_apart() -> None:
    with pytest.raises(PayloadError) as raised:
        decode(b"{nope")
    assert raised.value.not_json


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024x1024", (1024, 1024)), ("1280X720", (1280, 720)), ("big", (None, None)),
     (None, (None, None)), ("x720", (None, None))],
)
def test_dimensions(text: str | None, expected: tuple[int | None, int | None]) -> None:
    assert parse_dimensions(text) == expected
