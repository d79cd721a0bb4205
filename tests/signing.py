"""Signed deliveries for tests: the gateway's own signer, with the media type a sender sets.

`tests/test_webhooks_verify.py` checks that signer against the `standardwebhooks` package.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.webhooks.signing import signature_headers


def sign(body: bytes, secret_key: bytes, msg_id: str, timestamp: int) -> dict[str, str]:
    """The headers of a signed JSON delivery."""
    return {"Content-Type": "application/json",
            **signature_headers(secret_key, msg_id, timestamp, body)}


def signed(
    payload: Any, secret_key: bytes, msg_id: str, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A JSON body and the headers signing it, timestamped now unless told otherwise."""
    body = msgspec.json.encode(payload)
    when = int(time.time()) if timestamp is None else timestamp
    return body, sign(body, secret_key, msg_id, when)
