"""The existing app's Prisma rows, read as the gateway's records: which status a legacy
status is, which files a row holds, and whether a row is the old webhook's damage.

Pure: the store reads the rows, the import use case writes what these functions decide.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import parse_dimensions
from gateway.jobs.records import FileRecord
from gateway.jobs.state import Status

# What the old webhook wrote as prompt when the backend sent no description.
PLACEHOLDER_PROMPT: Final = "Image générée depuis le backend"
# The notification source the old webhook wrote for a generation it created itself.
BACKEND_DIRECT: Final = "backend-direct"

# The backend's job ids (uuid4 text); the app's own ids are CUIDs.
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Legacy status -> the gateway's: the legacy enum holds the gateway's words but QUEUED,
# CANCELLED and TIMED_OUT, plus PROCESSING (older rows: the backend had the job, no step
# reported yet), read as QUEUED, the gateway's "the backend accepted it", never further.
_STATUS: Final = {
    **{s.value: s for s in Status
       if s not in (Status.QUEUED, Status.CANCELLED, Status.TIMED_OUT)},
    "PROCESSING": Status.QUEUED,
}

TABLES: Final = {Kind.IMAGE: ("image_generations", "image_files"),
                 Kind.VIDEO: ("video_generations", "video_files")}


def status_of(word: str) -> Status | None:
    """A legacy status -> the gateway's; None for a value outside the legacy enum."""
    return _STATUS.get(word)


def is_backend_id(legacy_id: str) -> bool:
    return _UUID.match(legacy_id) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Evidence:
    """What is known of one UUID-id generation: the clues of seed 003's damage."""

    on_first_user: bool
    backend_direct_notification: bool
    prompt_is_description: bool
    prompt_is_placeholder: bool


def misattributed(legacy_id: str, evidence: Evidence) -> bool:
    """The old webhook made this row on the first user: a backend id where the app writes
    CUIDs, on the first user, and a prompt or notification only that webhook writes.
    A backend id alone is not enough (a later app version could have stored one)."""
    if not is_backend_id(legacy_id) or not evidence.on_first_user:
        return False
    return (evidence.backend_direct_notification or evidence.prompt_is_description
            or evidence.prompt_is_placeholder)


def file_record(kind: Kind, row: Mapping[str, Any]) -> FileRecord | str:
    """A legacy file row as the gateway's file, or why it cannot be read."""
    width, height = row["width"], row["height"]
    if width is None or height is None:
        parsed = parse_dimensions(row["aspectRatio"])
        width = width if width is not None else parsed[0]
        height = height if height is not None else parsed[1]
    if width is None or height is None:
        return f"no dimensions: width/height empty and aspectRatio {row['aspectRatio']!r}"
    metadata = row["metadata"] if isinstance(row["metadata"], dict) else {}
    description = metadata.get("description")
    return FileRecord(
        url=row["fileUrl"],
        storage_key=row["s3Key"],
        filename=row["filename"],
        format=row["format"],
        size_bytes=row["fileSize"],
        width=width,
        height=height,
        duration_seconds=row.get("durationSeconds") if kind is Kind.VIDEO else None,
        description=description if isinstance(description, str) else None,
    )


def params_of(kind: Kind, row: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields a legacy generation kept, in the gateway's request names."""
    if kind is Kind.IMAGE:
        params = {"num_images": row["numImages"], "size": row["size"], "format": row["format"],
                  "style": row["style"], "quality": row["quality"], "model": row["model"]}
    else:
        params = {"aspect_ratio": row["aspectRatio"], "duration_seconds": row["durationSeconds"],
                  "number_of_videos": row["numberOfVideos"],
                  "person_generation": row["personGeneration"], "model": row["model"]}
    if row["inputImageUrl"]:
        params["input_image_url"] = row["inputImageUrl"]
    return {k: v for k, v in params.items() if v is not None}


def orphan_payload(kind: Kind, row: Mapping[str, Any],
                   files: Sequence[FileRecord]) -> dict[str, Any]:
    """A misattributed generation as the completed webhook the backend sent for it."""
    reports = [{
        "url": f.url, "file_path": f.storage_key, "description": f.description,
        "format": f.format, "size_bytes": f.size_bytes,
        "dimensions": f"{f.width}x{f.height}",
        **({"duration_seconds": f.duration_seconds}
           if f.duration_seconds is not None else {}),
    } for f in files]
    metadata: dict[str, Any] = {"model_name": row["model"]}
    if row["processingTime"] is not None and row["processingTime"] >= 0:
        metadata["generation_time_seconds"] = row["processingTime"]
    data: dict[str, Any] = {"images" if kind is Kind.IMAGE else "videos": reports,
                            "metadata": metadata}
    payload: dict[str, Any] = {"job_id": row["id"], "status": "completed", "progress": 100,
                               "timestamp": _iso(row["createdAt"]), "data": data}
    if row["prompt"] != PLACEHOLDER_PROMPT:
        payload["original_prompt"] = row["prompt"]
    return payload


def _iso(moment: dt.datetime) -> str:
    return moment.replace(tzinfo=dt.UTC).isoformat() if moment.tzinfo is None else \
        moment.isoformat()
