"""The two webhook routes: verify before parsing, then the delivery's transaction (its own,
or with the others that the group-commit stage gathered meanwhile).

Order, cheapest and least trusting first: Content-Type (415), the body read up to the
limit (413), the signature (401, one body for every cause), the payload (400 / 422 naming
the field), then the store. Nothing is answered 2xx before its transaction committed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web
from prometheus_client import Counter, Histogram

from gateway import keys, metrics
from gateway.database import get_database
from gateway.errors import (
    BadRequest,
    PayloadTooLarge,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from gateway.jobs.kinds import Kind
from gateway.jobs.payload import PayloadError, WebhookPayload, decode
from gateway.jobs.prompts import fingerprint
from gateway.store.webhooks import Delivery
from gateway.usecases.ingest import Ingested, Outcome, ingest_alone
from gateway.webhooks.verify import VerificationFailed, Verified, Verifier

log = structlog.get_logger(__name__)

ROUTES: Final = {
    Kind.IMAGE: "/api/webhooks/image-completion",
    Kind.VIDEO: "/api/webhooks/video-completion",
}

# The same words for every cause, so a caller learns nothing about which check failed.
UNAUTHORIZED_DETAIL: Final = "The webhook signature is missing, invalid or expired."

_JSON_TYPES: Final = frozenset({"application/json"})
_ANSWERS: Final = {
    outcome: (
        202 if outcome is Outcome.ORPHANED else 200,
        msgspec.json.encode({"outcome": outcome.value}),
    )
    for outcome in Outcome
}


@dataclasses.dataclass(frozen=True, slots=True)
class _Counters:
    """The kind's metric children, bound once rather than looked up per delivery."""

    outcomes: dict[Outcome, Counter]
    invalid_signature: Counter
    invalid_payload: Counter
    too_large: Counter
    legacy_auth: Counter
    processing: Histogram

    @classmethod
    def bind(cls, kind: Kind) -> _Counters:
        def child(outcome: str) -> Counter:
            return metrics.WEBHOOKS.labels(kind.value, outcome)

        return cls(
            outcomes={outcome: child(outcome.value) for outcome in Outcome},
            invalid_signature=child("invalid_signature"),
            invalid_payload=child("invalid_payload"),
            too_large=child("too_large"),
            legacy_auth=child("legacy_auth"),
            processing=metrics.WEBHOOK_PROCESSING.labels(kind.value),
        )


_COUNTERS: Final = {kind: _Counters.bind(kind) for kind in Kind}


def get_verifier(app: web.Application) -> Verifier:
    try:
        return app[keys.WEBHOOK_VERIFIER]
    except KeyError:
        raise RuntimeError("webhooks are not set up: call setup_webhooks(app)") from None


async def image_completion(request: web.Request) -> web.Response:
    return await receive(request, Kind.IMAGE)


async def video_completion(request: web.Request) -> web.Response:
    return await receive(request, Kind.VIDEO)


async def receive(request: web.Request, kind: Kind) -> web.Response:
    started = time.perf_counter()
    counters = _COUNTERS[kind]
    if request.content_type not in _JSON_TYPES:
        log.warning("webhook_unsupported_media_type", kind=kind.value)
        raise UnsupportedMediaType()
    limit = request.config_dict[keys.SETTINGS].webhook_max_body_bytes
    body = await _read_body(request, limit)
    if body is None:
        counters.too_large.inc()
        log.warning("webhook_too_large", kind=kind.value, limit=limit)
        raise PayloadTooLarge(f"The webhook body is larger than {limit} bytes.")

    try:
        verified = get_verifier(request.app).verify(request.headers, body)
    except VerificationFailed as failure:
        counters.invalid_signature.inc()
        log.warning("webhook_rejected", kind=kind.value, reason=failure.reason)
        raise Unauthorized(UNAUTHORIZED_DETAIL) from None
    if verified.legacy:
        counters.legacy_auth.inc()

    payload = _decode(body, kind, verified, counters)
    delivery = Delivery(kind, _dedupe_key(kind, verified, body), payload, body)
    batches = request.app.get(keys.WEBHOOK_BATCHES)
    if batches is not None:
        result = await batches.submit(delivery)
    else:
        result = await ingest_alone(get_database(request.app), delivery)
    # committed: from here on, only bookkeeping
    if (result.applied is not None and result.applied.transition.finished
            and (dispatcher := request.app.get(keys.DISPATCHER)) is not None):
        dispatcher.job_ended(kind)
    counters.outcomes[result.outcome].inc()
    _observe(kind, result)
    _log(kind, verified, payload, result)
    counters.processing.observe(time.perf_counter() - started)
    status, answer = _ANSWERS[result.outcome]
    return web.Response(status=status, body=answer, content_type="application/json")


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The raw body, or None as soon as it is known to exceed `limit` (nothing more read)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(body: bytes, kind: Kind, verified: Verified, counters: _Counters) -> WebhookPayload:
    try:
        return decode(body)
    except PayloadError as error:
        counters.invalid_payload.inc()
        problem = "not_json" if error.not_json else "shape"
        log.warning("webhook_invalid_payload", kind=kind.value,
                    webhook_id=verified.webhook_id, problem=problem, field=error.field)
        if error.not_json:
            raise BadRequest("The webhook body is not valid JSON.") from None
        raise Unprocessable(str(error), field=error.field) from None


def _dedupe_key(kind: Kind, verified: Verified, body: bytes) -> str:
    """The sender's message id; for a legacy delivery without one, its route and content."""
    if verified.webhook_id is not None:
        return f"id:{verified.webhook_id}"
    digest = hashlib.sha256(ROUTES[kind].encode() + b"\n" + body).hexdigest()
    return f"sha256:{digest}"


def _observe(kind: Kind, result: Ingested) -> None:
    applied, job = result.applied, result.job
    if applied is None or job is None or not applied.transition.applied:
        return
    state = applied.transition.state
    now = dt.datetime.now(dt.UTC)
    if job.first_webhook_at is None:
        metrics.FIRST_WEBHOOK_DELAY.labels(kind.value).observe(
            (now - job.created_at).total_seconds()
        )
    if applied.transition.finished:
        metrics.JOB_DURATION.labels(kind.value, state.status.value).observe(
            (now - job.created_at).total_seconds()
        )
    if applied.notification_id is not None:
        metrics.NOTIFICATIONS_CREATED.labels(f"{kind.label}_{state.status.value}").inc()


def _log(kind: Kind, verified: Verified, payload: WebhookPayload, result: Ingested) -> None:
    context: dict[str, Any] = {
        "kind": kind.value,
        "webhook_id": verified.webhook_id,
        "backend_job_id": payload.job_id,
        "status": payload.job_status.value,
    }
    if verified.legacy:
        context["auth"] = "legacy"
    if result.job is not None:
        context["job_id"] = result.job.id
    if result.outcome is Outcome.APPLIED:
        assert result.applied is not None
        state = result.applied.transition.state
        log.info("webhook_applied", **context, job_status=state.status.value,
                 progress=state.progress, seq=result.applied.seq)
    elif result.outcome is Outcome.STALE:
        assert result.job is not None
        log.info("webhook_stale", **context, job_status=result.job.state.status.value,
                 progress=result.job.state.progress)
    elif result.outcome is Outcome.DUPLICATE:
        log.info("webhook_duplicate", **context)
    else:
        prompt = payload.hinted_prompt(kind)
        log.warning(
            "webhook_orphaned",
            **context,
            orphan_event_id=result.orphan_event_id,
            hinted_user_id=payload.hinted_user_id,
            prompt_length=len(prompt) if prompt else None,
            prompt_fingerprint=fingerprint(prompt) if prompt else None,
        )
