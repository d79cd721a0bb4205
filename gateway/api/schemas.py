"""The client API's bodies, answers and query strings, as msgspec types.

Handlers decode and encode with exactly these types, and `/openapi.json` is generated from
them, so the document and the validation cannot disagree. Rules JSON Schema can express are
constraints (`msgspec.Meta`); the others (trimming, sizes inside strings, an image's bytes)
are checked in `__post_init__`, which raises `FieldError` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from typing import Annotated, Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec

from gateway.errors import BadRequest, PayloadTooLarge, Unprocessable
from gateway.jobs.kinds import Kind
from gateway.jobs.state import Status

PROMPT_MAX: Final = 4000
SIDE_MIN: Final = 256
SIDE_MAX: Final = 4096
INPUT_IMAGE_MAX_BYTES: Final = 10 * 1024 * 1024
# C0 and C1 control characters, except tab and line breaks (prompts are typed in text areas)
CONTROL_CHARACTERS: Final = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
NO_CONTROL: Final = rf"^[^{CONTROL_CHARACTERS}]*$"
_CONTROL = re.compile(rf"[{CONTROL_CHARACTERS}]")
_DATA_URL = re.compile(r"^data:image/(png|jpeg|webp);base64,", re.IGNORECASE)
_IMAGE_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)


class FieldError(Exception):
    """A field breaks a rule (`message` says which, without the field's name); `too_large`
    makes it a 413 rather than a 422."""

    def __init__(self, field: str, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.too_large = too_large


Prompt = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        pattern=NO_CONTROL,
        description=f"1-{PROMPT_MAX} characters after trimming; no control characters "
        "(tab and line breaks allowed)",
        examples=["a red fox in the snow, golden hour"],
    ),
]
Size = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description=f"WIDTHxHEIGHT, each side {SIDE_MIN}-{SIDE_MAX}",
    ),
]
HttpsUrl = Annotated[
    str,
    msgspec.Meta(pattern=r"^https://\S+$", max_length=4096, description="an https:// URL"),
]
Style = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_CONTROL)]
InputImage = Annotated[
    str,
    msgspec.Meta(
        description="a PNG, JPEG or WEBP image of at most 10 MiB, base64 "
        "(optionally as a `data:image/...;base64,` URL); larger is 413",
    ),
]

# msgspec's message for a failed pattern shows the regex; these say what is expected instead
_PATTERN_HINTS: Final = {
    "prompt": "must not contain control characters",
    "size": "must be WIDTHxHEIGHT, e.g. 1024x1024",
    "input_image_url": "must be an https:// URL",
    "style": "must not contain control characters",
}


def _prompt(value: str) -> str:
    trimmed = value.strip()
    if not trimmed:
        raise FieldError("prompt", "must not be blank")
    if len(trimmed) > PROMPT_MAX:
        raise FieldError("prompt", f"must be at most {PROMPT_MAX} characters after trimming")
    return trimmed


def _size(value: str) -> None:
    for side in value.split("x"):
        if not SIDE_MIN <= int(side) <= SIDE_MAX:
            raise FieldError("size", f"each side must be between {SIDE_MIN} and {SIDE_MAX}")


def _https_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or "@" in parts.netloc:
        raise FieldError("input_image_url", "must be an https:// URL with a host")


def _input_image(value: str) -> None:
    text = _DATA_URL.sub("", value, count=1)
    # 4 base64 characters carry 3 bytes: refuse before decoding anything that cannot fit
    if len(text) > (INPUT_IMAGE_MAX_BYTES + 2) // 3 * 4:
        raise FieldError("input_image_base64", "decodes to more than 10 MiB", too_large=True)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError("input_image_base64", "is not valid base64") from None
    if len(data) > INPUT_IMAGE_MAX_BYTES:
        raise FieldError("input_image_base64", "decodes to more than 10 MiB", too_large=True)
    if image_format(data) is None:
        raise FieldError("input_image_base64", "must be a PNG, JPEG or WEBP image")


def image_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP by the file's magic bytes; None for anything else."""
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


class ImageRequest(msgspec.Struct, kw_only=True):
    """`POST /api/images/generate`."""

    prompt: Prompt
    input_image_url: HttpsUrl | None = None
    num_images: Annotated[int, msgspec.Meta(ge=1, le=4)] = 1
    size: Size = "1024x1024"
    format: Literal["PNG", "JPEG", "WEBP"] = "PNG"
    style: Style = "photorealistic"
    quality: Literal["standard", "high"] = "standard"

    def __post_init__(self) -> None:
        self.prompt = _prompt(self.prompt)
        _size(self.size)
        if self.input_image_url is not None:
            _https_url(self.input_image_url)


class VideoRequest(msgspec.Struct, kw_only=True):
    """`POST /api/videos/generate`."""

    prompt: Prompt
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    duration_seconds: Annotated[int, msgspec.Meta(ge=5, le=8)] = 8
    number_of_videos: Annotated[int, msgspec.Meta(ge=1, le=4)] = 1
    person_generation: Literal["ALLOW_ALL", "DONT_ALLOW"] = "ALLOW_ALL"
    input_image_base64: InputImage | None = None

    def __post_init__(self) -> None:
        self.prompt = _prompt(self.prompt)
        if self.input_image_base64 is not None:
            _input_image(self.input_image_base64)


REQUEST_TYPES: Final[dict[Kind, type[ImageRequest] | type[VideoRequest]]] = {
    Kind.IMAGE: ImageRequest,
    Kind.VIDEO: VideoRequest,
}


class JobAccepted(msgspec.Struct):
    job_id: str
    status: Status
    message: str | None
    created_at: dt.datetime


class JobStatusView(msgspec.Struct):
    job_id: str
    status: Status
    progress: Annotated[int, msgspec.Meta(ge=0, le=100)]
    message: str | None
    updated_at: dt.datetime


class ImageFile(msgspec.Struct):
    url: str
    format: str | None
    size_bytes: int | None
    width: int | None
    height: int | None


class VideoFile(msgspec.Struct):
    url: str
    format: str | None
    size_bytes: int | None
    width: int | None
    height: int | None
    duration_seconds: float | None


class ResultMetadata(msgspec.Struct):
    model_name: str | None
    generation_time_seconds: float | None
    prompt: str
    params: dict[str, Any]
    created_at: dt.datetime
    finished_at: dt.datetime | None
    error_message: str | None


class ImageResult(msgspec.Struct):
    job_id: str
    status: Status
    images: list[ImageFile]
    metadata: ResultMetadata


class VideoResult(msgspec.Struct):
    job_id: str
    status: Status
    videos: list[VideoFile]
    metadata: ResultMetadata


class ImageGeneration(msgspec.Struct):
    job_id: str
    status: Status
    progress: int
    message: str | None
    prompt: str
    params: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    images: list[ImageFile]


class VideoGeneration(msgspec.Struct):
    job_id: str
    status: Status
    progress: int
    message: str | None
    prompt: str
    params: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    videos: list[VideoFile]


class ImageGallery(msgspec.Struct):
    generations: list[ImageGeneration]
    next_cursor: Annotated[
        str | None, msgspec.Meta(description="pass as `cursor` for the next page; null at the end")
    ]


class VideoGallery(msgspec.Struct):
    generations: list[VideoGeneration]
    next_cursor: Annotated[
        str | None, msgspec.Meta(description="pass as `cursor` for the next page; null at the end")
    ]


Limit = Annotated[int, msgspec.Meta(ge=1, le=100, description="page size, at most 100")]
Cursor = Annotated[
    str, msgspec.Meta(max_length=512, description="`next_cursor` of the previous page")
]


class GalleryQuery(msgspec.Struct, kw_only=True):
    limit: Limit = 20
    cursor: Cursor | None = None


class NotificationView(msgspec.Struct):
    id: int
    type: str
    title: str
    message: str
    job_id: str | None
    metadata: dict[str, Any]
    read: bool
    read_at: dt.datetime | None
    created_at: dt.datetime


class NotificationPage(msgspec.Struct):
    notifications: list[NotificationView]
    unread_count: int
    next_cursor: str | None


class NotificationQuery(msgspec.Struct, kw_only=True):
    unread: Annotated[bool, msgspec.Meta(description="only unread notifications")] = False
    limit: Limit = 20
    cursor: Cursor | None = None


class JobEvent(msgspec.Struct):
    """The `data` of one Server-Sent Event: the job's state after a change."""

    job_id: str
    kind: Kind
    seq: int
    status: Status
    progress: int
    message: str | None
    error_message: str | None
    updated_at: dt.datetime


IdempotencyKey = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[\x21-\x7e]{1,255}$",
        description="1-255 visible ASCII characters; the same key and body return the same job",
    ),
]


# --- decoding ----------------------------------------------------------------------------

T = TypeVar("T")

_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")


def _field_of(message: str) -> tuple[str, str]:
    """(field path, message without the path) from a msgspec ValidationError."""
    path = ""
    if match := _AT_PATH.search(message):
        path = match["path"]
        message = message[: match.start()]
    if match := _MISSING.match(message):
        path = f"{path}.{match['name']}" if path else match["name"]
    return path or "body", message


def validation_error(error: msgspec.ValidationError) -> Unprocessable:
    field, message = _field_of(str(error))
    if "matching regex" in message and field in _PATTERN_HINTS:
        message = _PATTERN_HINTS[field]
    return Unprocessable(f"{field}: {message}", field=field)


def decode_body(body: bytes, model: type[T]) -> T:
    """A JSON body into `model`: 400 when not JSON, 422 (or 413) naming the field."""
    try:
        return msgspec.json.decode(body, type=model)
    except FieldError as error:
        detail = f"{error.field}: {error.message}"
        if error.too_large:
            raise PayloadTooLarge(detail, field=error.field) from None
        raise Unprocessable(detail, field=error.field) from None
    except msgspec.ValidationError as error:
        raise validation_error(error) from None
    except msgspec.DecodeError:
        raise BadRequest("The body is not valid JSON.") from None


def decode_query(query: dict[str, str], model: type[T]) -> T:
    """A query string into `model` (strings converted to numbers and booleans)."""
    try:
        return msgspec.convert(query, model, strict=False)
    except msgspec.ValidationError as error:
        raise validation_error(error) from None
