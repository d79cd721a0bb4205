"""The generator backend's HTTP API as delivery calls it: one request, its answer classified.

Every URL is `BACKEND_URL` plus a fixed path; the only variable segment is a backend job id
checked against a strict pattern, so nothing a user sends can point a request elsewhere.
Redirects are never followed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import re
from typing import Any, Final

import aiohttp
import msgspec

from gateway.errors import GatewayError
from gateway.jobs.kinds import Kind
from gateway.settings import Secret

# Statuses that say "not now" rather than "no": worth another try.
TRANSIENT_STATUSES: Final = frozenset({408, 425, 429})
MAX_ANSWER_BYTES: Final = 64 * 1024
MAX_DETAIL_CHARS: Final = 200
# An id we put in a URL path: no slash, no dot segment, nothing to encode.
_PATH_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._:-]{0,255}")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class DeliveryError(GatewayError):
    """A call to the generator backend did not succeed."""


class Transient(DeliveryError):
    """The generator backend could not take the call now; another try may succeed."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


class TimedOut(Transient):
    """The generator backend did not answer within the call's time limit: it may be hanging,
    so the next try waits for the retry schedule rather than follow at once."""


class Refused(DeliveryError):
    """The generator backend refused the call; trying again will not change that."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {detail}".strip())
        self.status = status
        self.detail = detail


class Unsendable(DeliveryError):
    """The call cannot be made at all (a backend job id that cannot go in a URL)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    status: int
    # the `job_id` of the answer's JSON, when it has one
    job_id: str | None


def is_path_safe(backend_job_id: str) -> bool:
    return _PATH_ID.fullmatch(backend_job_id) is not None


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date; None when absent
    or malformed."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


class BackendClient:
    """Calls to `BACKEND_URL` on one shared ClientSession."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, api_key: Secret | None
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._api_key = api_key

    async def generate(
        self, kind: Kind, job_id: str, payload: Any, *, time_limit: float
    ) -> Accepted:
        """POST /api/{images,videos}/generate with the stored body; our id as the key."""
        url = f"{self._base}/api/{kind.plural}/generate"
        return await self._post(url, payload, idempotency_key=job_id, time_limit=time_limit)

    async def cancel(
        self, kind: Kind, job_id: str, backend_job_id: str, payload: Any, *, time_limit: float
    ) -> Accepted:
        """POST /api/{images,videos}/{backend_job_id}/cancel."""
        if not is_path_safe(backend_job_id):
            raise Unsendable(f"the backend job id {backend_job_id[:64]!r} cannot go in a URL")
        url = f"{self._base}/api/{kind.plural}/{backend_job_id}/cancel"
        body = payload if payload is not None else {}
        key = f"{job_id}:cancel"
        return await self._post(url, body, idempotency_key=key, time_limit=time_limit)

    async def _post(
        self, url: str, body: Any, *, idempotency_key: str, time_limit: float
    ) -> Accepted:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Idempotency-Key": idempotency_key,
        }
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        try:
            async with self._session.post(
                url,
                data=_encode(body),
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=time_limit),
            ) as response:
                answer = await _read_limited(response)
                if self._api_key is not None:
                    # an error body never carries our key on into logs or job messages
                    answer = answer.replace(self._api_key.reveal().encode(), b"[redacted]")
                return _classify(response, answer)
        except TimeoutError:
            raise TimedOut(f"no answer within {time_limit:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise Transient(f"connection failed: {_os_reason(exc)}") from None
        except aiohttp.ClientOSError as exc:
            raise Transient(f"connection error: {exc.strerror or type(exc).__name__}") from None
        except aiohttp.ServerDisconnectedError:
            raise Transient("the connection was dropped before an answer") from None
        except aiohttp.ClientPayloadError:
            raise Transient("the answer was cut off") from None
        except aiohttp.ClientError as exc:
            raise Transient(f"connection error: {type(exc).__name__}") from None


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    """At most MAX_ANSWER_BYTES of the body: enough for a job id or an error message."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(16 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES:
            break
    return b"".join(chunks)[:MAX_ANSWER_BYTES]


def _classify(response: aiohttp.ClientResponse, body: bytes) -> Accepted:
    status = response.status
    if 200 <= status < 300:
        return Accepted(status, _answer_job_id(body))
    if status in TRANSIENT_STATUSES or status >= 500:
        raise Transient(
            f"HTTP {status}",
            status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if 300 <= status < 400:
        raise Refused(status, "a redirect, which is not followed")
    raise Refused(status, _detail(body) or response.reason or "")


def _answer_job_id(body: bytes) -> str | None:
    try:
        answer = _decode(body)
    except msgspec.DecodeError:
        return None
    job_id = answer.get("job_id") if isinstance(answer, dict) else None
    if isinstance(job_id, str) and 0 < len(job_id.strip()) <= 512:
        return job_id.strip()
    return None


def _detail(body: bytes) -> str:
    """The backend's own words about a refusal, short and on one line."""
    text = ""
    try:
        answer = _decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", errors="replace")
    else:
        if isinstance(answer, dict):
            for field in ("error_message", "error", "message", "detail", "title"):
                value = answer.get(field)
                if isinstance(value, str) and value.strip():
                    text = value
                    break
        if not text:
            text = body.decode("utf-8", errors="replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > MAX_DETAIL_CHARS:
        text = text[: MAX_DETAIL_CHARS - 1] + "…"
    return text


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    return exc.strerror or type(exc.os_error).__name__
