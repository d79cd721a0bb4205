"""Who may post a webhook: Standard Webhooks signatures, or the legacy shared-secret header.

Standard Webhooks (https://www.standardwebhooks.com), in the format `signing` makes:
`webhook-id`, `webhook-timestamp` (integer Unix seconds) and `webhook-signature`
(space-separated `v1,<base64>` entries), the signature being HMAC-SHA256 over
`{id}.{timestamp}.{raw body}` with a `whsec_` key. Every configured key is tried, so a
secret can be rotated without a gap. The timestamp must be within the tolerance in both
directions, which bounds replays.

The verifier works on the raw bytes and never raises anything but `VerificationFailed`,
whatever the headers hold: its `reason` goes to the logs, never to the caller, who always
gets the same answer.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from gateway.settings import Settings
from gateway.webhooks.signing import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signed_prefix,
)

LEGACY_HEADER: Final = "x-webhook-secret"

# The id becomes the dedupe key (a btree key), so it stays short.
MAX_ID_LENGTH: Final = 256
# Unix seconds for the next few thousand years; longer is garbage, not a time.
_MAX_TIMESTAMP_DIGITS: Final = 12


class VerificationFailed(Exception):
    """The delivery is not authenticated; `reason` is for the logs only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Verified:
    """An authenticated delivery: its `webhook-id` (None for legacy ones without it)."""

    webhook_id: str | None
    legacy: bool = False


class Verifier:
    """Checks deliveries against keys decoded once, at startup."""

    __slots__ = ("_clock", "_legacy_digest", "_macs", "_tolerance")

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        tolerance_seconds: int,
        legacy_secret: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Keyed HMAC states prepared once; each delivery only copies them.
        self._macs = tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)
        self._tolerance = tolerance_seconds
        # Compared as digests, so neither the content nor the length of the secret leaks.
        self._legacy_digest = (
            hashlib.sha256(legacy_secret.encode()).digest() if legacy_secret is not None else None
        )
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        legacy = settings.legacy_webhook_secret
        return cls(
            settings.webhook_keys(),
            tolerance_seconds=settings.webhook_tolerance_seconds,
            legacy_secret=legacy.reveal() if legacy is not None else None,
        )

    @property
    def legacy_enabled(self) -> bool:
        return self._legacy_digest is not None

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        """Authenticate one delivery or raise VerificationFailed."""
        signature = headers.get(SIGNATURE_HEADER)
        if signature is None and self._legacy_digest is not None:
            presented = headers.get(LEGACY_HEADER)
            if presented is not None:
                return self._verify_legacy(presented, headers.get(ID_HEADER))
        msg_id = headers.get(ID_HEADER)
        timestamp = headers.get(TIMESTAMP_HEADER)
        if not msg_id or not timestamp or not signature:
            raise VerificationFailed("missing_headers")
        if not _is_token(msg_id):
            raise VerificationFailed("malformed_id")
        self._check_timestamp(timestamp)
        if not signature.isascii():
            raise VerificationFailed("malformed_signature")
        expected = self._expected(signed_prefix(msg_id, timestamp), body)
        for entry in signature.split():
            version, comma, encoded = entry.partition(",")
            if version != "v1" or not comma:
                continue
            try:
                presented_mac = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            # the decoder ignores a final character's unused bits: only the canonical
            # encoding counts, so a signature with any byte changed never matches
            if base64.b64encode(presented_mac).decode("ascii") != encoded:
                continue
            for mac in expected:
                if hmac.compare_digest(mac, presented_mac):
                    return Verified(msg_id)
        raise VerificationFailed("no_matching_signature")

    def _expected(self, prefix: bytes, body: bytes) -> list[bytes]:
        digests = []
        for keyed in self._macs:
            mac = keyed.copy()
            mac.update(prefix)
            mac.update(body)
            digests.append(mac.digest())
        return digests

    def _check_timestamp(self, timestamp: str) -> None:
        if not (
            timestamp.isascii()
            and timestamp.isdigit()
            and len(timestamp) <= _MAX_TIMESTAMP_DIGITS
        ):
            raise VerificationFailed("malformed_timestamp")
        age = int(self._clock()) - int(timestamp)
        if age > self._tolerance:
            raise VerificationFailed("expired_timestamp")
        if age < -self._tolerance:
            raise VerificationFailed("future_timestamp")

    def _verify_legacy(self, presented: str, msg_id: str | None) -> Verified:
        assert self._legacy_digest is not None
        # aiohttp keeps undecodable header bytes as surrogates: hash them as they came.
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        if not hmac.compare_digest(digest, self._legacy_digest):
            raise VerificationFailed("legacy_secret_mismatch")
        if msg_id is not None and not _is_token(msg_id):
            raise VerificationFailed("malformed_id")
        return Verified(msg_id, legacy=True)


def _is_token(value: str) -> bool:
    """Printable ASCII without spaces, of a sane length."""
    return (
        0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )
