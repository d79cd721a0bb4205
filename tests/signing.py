"""Standard Webhooks signatures for tests, made the way a sender makes them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import msgspec


def sign(body: bytes, secret_key: bytes, msg_id: str, timestamp: int) -> dict[str, str]:
    """The headers of a signed delivery: HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    mac = hmac.new(secret_key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
    }


def signed(
    payload: Any, secret_key: bytes, msg_id: str, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A JSON body and the headers signing it, timestamped now unless told otherwise."""
    body = msgspec.json.encode(payload)
    when = int(time.time()) if timestamp is None else timestamp
    return body, sign(body, secret_key, msg_id, when)
