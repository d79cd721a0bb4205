"""What the generator backend reports in its webhooks, and what that means for a job.

The payload is the Flask backend's (seeds/004): `job_id`, `status`, optional `user_id` and
`original_prompt` hints, `progress`, `message`, `error_message`, and on completion `data`
with `images` or `videos` and `metadata`. Unknown fields are accepted (backends add fields);
the raw body is what gets stored, so nothing is lost.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from gateway.jobs.kinds import Kind
from gateway.jobs.records import FileRecord, JobUpdate
from gateway.jobs.state import Event, Status

Text = Annotated[str, msgspec.Meta(max_length=100_000)]
ShortText = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class FileReport(msgspec.Struct, kw_only=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    file_path: Text | None = None
    description: Text | None = None
    format: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    size_bytes: Annotated[int, msgspec.Meta(ge=0)] | None = None
    dimensions: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    duration_seconds: Annotated[float, msgspec.Meta(ge=0)] | None = None


class Metadata(msgspec.Struct, kw_only=True):
    model_name: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    generation_time_seconds: Annotated[float, msgspec.Meta(ge=0)] | None = None


class Data(msgspec.Struct, kw_only=True):
    images: list[FileReport] = []
    videos: list[FileReport] = []
    metadata: Metadata | None = None
    original_prompt: Text | None = None
    user_id: ShortText | None = None


class WebhookPayload(msgspec.Struct, kw_only=True):
    job_id: ShortText
    status: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    timestamp: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    user_id: ShortText | None = None
    original_prompt: Text | None = None
    progress: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    message: Text | None = None
    error_message: Text | None = None
    data: Data | None = None

    def __post_init__(self) -> None:
        if Status.from_webhook(self.status) is None:
            raise ValueError(f"unknown status {self.status[:32]!r}")

    @property
    def job_status(self) -> Status:
        status = Status.from_webhook(self.status)
        assert status is not None  # checked in __post_init__
        return status

    def files(self, kind: Kind) -> list[FileReport]:
        if self.data is None:
            return []
        return self.data.images if kind is Kind.IMAGE else self.data.videos

    @property
    def hinted_user_id(self) -> str | None:
        """The user the backend says this is for (top level, else inside data)."""
        return self.user_id or (self.data.user_id if self.data else None)

    def hinted_prompt(self, kind: Kind) -> str | None:
        """`original_prompt`, else the files' description (older backends)."""
        if self.original_prompt:
            return self.original_prompt
        if self.data and self.data.original_prompt:
            return self.data.original_prompt
        for f in self.files(kind):
            if f.description:
                return f.description
        return None

    def to_update(self, kind: Kind, *, source: str = "webhook") -> JobUpdate:
        metadata = self.data.metadata if self.data else None
        return JobUpdate(
            event=Event(self.job_status, self.progress),
            source=source,
            message=self.message,
            error_message=self.error_message,
            files=tuple(_file_record(f, kind) for f in self.files(kind)),
            model_name=metadata.model_name if metadata else None,
            generation_time_seconds=metadata.generation_time_seconds if metadata else None,
            from_webhook=True,
        )


_decoder = msgspec.json.Decoder(WebhookPayload)


class PayloadError(ValueError):
    """The body is not a valid webhook payload; `field` names where (a JSON path), when known."""

    def __init__(self, message: str, *, field: str | None = None, not_json: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.not_json = not_json


_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_AT_PATH = re.compile(r" - at `([^`]+)`$")


def decode(body: bytes) -> WebhookPayload:
    """Parse and validate a raw body; PayloadError says whether it was not JSON or wrong."""
    try:
        payload = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise PayloadError(str(exc), field=_field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise PayloadError(f"body is not JSON: {exc}", not_json=True) from None
    except RecursionError:
        raise PayloadError("the body is nested too deeply") from None
    # PostgreSQL text and jsonb cannot hold U+0000 (and the whole body may be kept as jsonb)
    if b"\\u0000" in body and (where := _nul_path(msgspec.json.decode(body), "$")):
        raise PayloadError("a value contains a NUL character (U+0000)", field=where)
    return payload


def _field_of(message: str) -> str | None:
    """The JSON path a msgspec validation message points at, a missing field's own included."""
    at = _AT_PATH.search(message)
    path = at[1] if at else None
    missing = _MISSING_FIELD.search(message)
    if missing:
        return f"{path or '$'}.{missing[1]}"
    if path is None and message.startswith("unknown status"):
        return "$.status"  # raised by WebhookPayload.__post_init__, which has no path
    return path


def _nul_path(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return path
            if found := _nul_path(item, f"{path}.{key}"):
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if found := _nul_path(item, f"{path}[{index}]"):
                return found
    return None


def decode_stored(payload: Any) -> WebhookPayload:
    """A payload kept in the database (jsonb) back into the schema."""
    return msgspec.convert(payload, WebhookPayload)


def parse_dimensions(text: str | None) -> tuple[int | None, int | None]:
    """'1024x1024' -> (1024, 1024); anything else -> (None, None)."""
    if not text:
        return None, None
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        return None, None
    return int(width), int(height)


def _file_record(f: FileReport, kind: Kind) -> FileRecord:
    width, height = parse_dimensions(f.dimensions)
    return FileRecord(
        url=f.url,
        storage_key=f.file_path,
        filename=f.file_path.rsplit("/", 1)[-1] if f.file_path else None,
        format=f.format.upper() if f.format else None,
        size_bytes=f.size_bytes,
        width=width,
        height=height,
        duration_seconds=f.duration_seconds if kind is Kind.VIDEO else None,
        description=f.description,
    )
