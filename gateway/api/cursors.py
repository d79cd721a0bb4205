"""Opaque pagination cursors: a page's last sort key, base64url JSON.

A cursor only says where a page ends; every query still filters on the caller, so a cursor
from someone else's listing shows nothing of theirs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any, TypeVar

import msgspec

from gateway.errors import Unprocessable

T = TypeVar("T")


def encode(*key: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).rstrip(b"=").decode()


def _decode(cursor: str, shape: type[T]) -> T:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return msgspec.json.decode(raw, type=shape)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise Unprocessable("cursor: not a cursor this listing gave", field="cursor") from None


def gallery_key(cursor: str) -> tuple[dt.datetime, str]:
    created_at, job_id = _decode(cursor, tuple[dt.datetime, str])
    if created_at.tzinfo is None:
        raise Unprocessable("cursor: not a cursor this listing gave", field="cursor")
    return created_at, job_id


def notification_key(cursor: str) -> int:
    (notification_id,) = _decode(cursor, tuple[int])
    return notification_id


def review_key(cursor: str) -> tuple[dt.datetime, str, str]:
    first_seen_at, kind, backend_job_id = _decode(cursor, tuple[dt.datetime, str, str])
    if first_seen_at.tzinfo is None or kind not in ("image", "video"):
        raise Unprocessable("cursor: not a cursor this listing gave", field="cursor")
    return first_seen_at, kind, backend_job_id
