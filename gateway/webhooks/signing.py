"""Standard Webhooks signatures as a sender makes them: the other side of `verify`.

A delivery carries `webhook-id`, `webhook-timestamp` (integer Unix seconds) and
`webhook-signature`, a `v1,<base64>` entry holding the HMAC-SHA256 of
`{id}.{timestamp}.{raw body}` under the key a `whsec_` secret stands for
(`gateway.settings.webhook_key`). The verifier checks what this module makes, so the
format is written once; the simulated backend and the benchmarks sign with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Final

ID_HEADER: Final = "webhook-id"
TIMESTAMP_HEADER: Final = "webhook-timestamp"
SIGNATURE_HEADER: Final = "webhook-signature"


def signed_prefix(msg_id: str, timestamp: int | str) -> bytes:
    """What the HMAC covers ahead of the raw body."""
    return f"{msg_id}.{timestamp}.".encode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,<base64>` signature of one delivery."""
    mac = hmac.new(key, signed_prefix(msg_id, timestamp), hashlib.sha256)
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signature_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers that sign `body` as delivery `msg_id` sent at `timestamp`."""
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(key, msg_id, timestamp, body),
    }
