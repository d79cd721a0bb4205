"""The identity provider's signing keys, fetched with aiohttp and cached.

Keys are looked up by `kid`. An unknown `kid` (a rotation, or a forged token) refetches the
set, at most once per `min_refetch_seconds` whatever the number of requests, so a storm of
made-up kids cannot turn the gateway against the provider. A failed fetch keeps the keys
already known: during a provider outage, tokens signed with them keep working.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp
import jwt
import msgspec
import structlog

log = structlog.get_logger(__name__)

# The asymmetric algorithms accepted from a JWKS; a symmetric ("oct") key there is ignored.
ALGORITHMS: Final = frozenset({"RS256", "ES256"})
MAX_JWKS_BYTES: Final = 512 * 1024


class JWKSUnavailable(Exception):
    """The key set could not be fetched and no key is known yet."""


class _KeySet(msgspec.Struct):
    keys: list[dict[str, Any]]


_decode_key_set = msgspec.json.Decoder(_KeySet).decode


def parse_key_set(body: bytes) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by kid."""
    found: dict[str, jwt.PyJWK] = {}
    for data in _decode_key_set(body).keys:
        kid = data.get("kid")
        if not isinstance(kid, str) or not kid or data.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if key.algorithm_name in ALGORITHMS:
            found[kid] = key
    return found


class JWKSCache:
    """Signing keys by kid, refreshed on an unknown kid or when older than `max_age_seconds`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        min_refetch_seconds: float = 30.0,
        max_age_seconds: float = 3600.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._url = url
        self._min_refetch = min_refetch_seconds
        self._max_age = max_age_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._clock = clock
        self._keys: Mapping[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        # one fetch at a time; concurrent callers wait for it instead of fetching again
        self._fetching = asyncio.Lock()

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def get(self, kid: str) -> jwt.PyJWK | None:
        """The key for `kid`, fetching the set when it is unknown or stale (rate-limited)."""
        key = self._keys.get(kid)
        if key is not None and not self._stale():
            return key
        async with self._fetching:
            key = self._keys.get(kid)
            if (key is None or self._stale()) and self._may_fetch():
                await self._fetch()
            key = self._keys.get(kid)
        if key is None and self._fetched_at is None:
            raise JWKSUnavailable(self._url)
        return key

    def _stale(self) -> bool:
        return self._fetched_at is not None and self._clock() - self._fetched_at > self._max_age

    def _may_fetch(self) -> bool:
        return self._attempted_at is None or self._clock() - self._attempted_at >= self._min_refetch

    async def _fetch(self) -> None:
        self._attempted_at = self._clock()
        try:
            async with self._session.get(
                self._url, timeout=self._timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, resp.history, status=resp.status
                    )
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError("the key set is too large")
            keys = parse_key_set(bytes(body))
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, ValueError) as exc:
            log.warning(
                "jwks_fetch_failed",
                url=self._url,
                error=type(exc).__name__,
                detail=str(exc)[:200],
                cached_keys=len(self._keys),
            )
            return
        if not keys:
            log.warning("jwks_without_usable_keys", url=self._url, cached_keys=len(self._keys))
            return
        self._keys = keys
        self._fetched_at = self._attempted_at
        log.info("jwks_fetched", url=self._url, keys=len(keys))
