"""Client routes for jobs: create, status, result, gallery, cancel.

A job is committed together with its outbox row before the answer, in one transaction, so
an accepted job is never lost and is delivered to the generator in the background. Every
read filters on the caller and the route's kind: anyone else's job, or a job of the other
kind, is answered exactly like a job that does not exist.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import keys, metrics
from gateway.api import cursors
from gateway.api.schemas import (
    REQUEST_TYPES,
    GalleryQuery,
    ImageFile,
    ImageGallery,
    ImageGeneration,
    ImageResult,
    JobAccepted,
    JobStatusView,
    ResultMetadata,
    VideoFile,
    VideoGallery,
    VideoGeneration,
    VideoResult,
    decode_body,
    decode_query,
)
from gateway.auth import authenticate
from gateway.database import get_database
from gateway.errors import Conflict, NotFound, Unprocessable
from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import fingerprint
from gateway.jobs.records import FileRecord
from gateway.jobs.state import Status
from gateway.store import owned_jobs
from gateway.store.owned_jobs import JobView, NewJob
from gateway.usecases import jobs as job_usecases

log = structlog.get_logger(__name__)

JOB_NOT_FOUND: Final = "No such job."
PENDING_MESSAGE: Final = "Waiting to be sent to the generator."
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

_encode = msgspec.json.Encoder().encode


def respond(
    value: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_encode(value), status=status, content_type="application/json", headers=headers
    )


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise Unprocessable(
            f"{IDEMPOTENCY_HEADER}: must be 1-255 visible ASCII characters",
            field=IDEMPOTENCY_HEADER,
        )
    return key


def _params(fields: dict[str, Any]) -> dict[str, Any]:
    """What the job keeps of its request: everything but the prompt and the input image,
    which stays in the outbox only until delivered."""
    params = {k: v for k, v in fields.items() if k not in ("prompt", "input_image_base64")}
    if "input_image_base64" in fields:
        params["input_image"] = True
    return params


def generate(kind: Kind) -> Handler:
    model = REQUEST_TYPES[kind]

    async def handler(request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request)
        key = _idempotency_key(request)
        job_request = decode_body(await request.read(), model)
        fields = {
            k: v for k, v in msgspec.to_builtins(job_request).items() if v is not None
        }
        new = NewJob(
            id=str(uuid.uuid4()),
            kind=kind,
            user_id=principal.user_id,
            org_id=principal.org_id,
            prompt=job_request.prompt,
            params=_params(fields),
            message=PENDING_MESSAGE,
            idempotency_key=key,
            request_hash=(
                hashlib.sha256(kind.value.encode() + b"\0" + _encode(job_request)).hexdigest()
                if key is not None
                else None
            ),
        )
        # the backend's request body: the client's fields plus our job id and the user
        payload = {**fields, "job_id": new.id, "user_id": principal.user_id}
        settings = request.config_dict[keys.SETTINGS]
        batches = request.app.get(keys.CREATE_BATCHES)
        try:
            admitted = await job_usecases.create(
                get_database(request.app), new, payload, settings.user_limits(kind),
                wait_for_admission=settings.backend_max_in_flight(kind) > 0,
                batched=batches.submit if batches is not None else None,
            )
        except job_usecases.LimitReached as refused:
            metrics.CREATES_REFUSED.labels(kind=kind.value, limit=refused.extra["limit"]).inc()
            log.info(
                "job_create_refused",
                kind=kind.value,
                user_id=principal.user_id,
                limit=refused.extra["limit"],
                value=refused.extra["value"],
                retry_after=refused.retry_after,
            )
            raise
        except job_usecases.KeyReused:
            raise Unprocessable(
                f"{IDEMPOTENCY_HEADER}: already used with a different request",
                field=IDEMPOTENCY_HEADER,
            ) from None
        created = admitted.created
        if created.inserted:
            metrics.JOBS_CREATED.labels(kind=kind.value).inc()
            log.info(
                "job_created",
                job_id=created.id,
                kind=kind.value,
                user_id=principal.user_id,
                prompt=fingerprint(job_request.prompt),
                idempotency_key=key is not None,
            )
        accepted = JobAccepted(
            job_id=created.id,
            status=created.status,
            message=created.message,
            created_at=created.created_at,
        )
        headers = dict(admitted.headers)
        if not created.inserted:
            headers["Idempotent-Replayed"] = "true"
        return respond(accepted, status=202, headers=headers)

    return handler


def status_view(job: JobView) -> JobStatusView:
    message = job.message
    if job.status is Status.FAILED and job.error_message:
        message = job.error_message  # what a client shows for a failure
    return JobStatusView(
        job_id=job.id,
        status=job.status,
        progress=job.progress,
        message=message,
        updated_at=job.updated_at,
    )


async def _owned(request: web.Request, kind: Kind, *, with_files: bool = False) -> JobView:
    principal = await authenticate(request)
    async with get_database(request.app).connection() as conn:
        job = await owned_jobs.get_owned(
            conn, request.match_info["id"], principal.user_id, kind, with_files=with_files
        )
    if job is None:
        raise NotFound(JOB_NOT_FOUND)
    return job


def status(kind: Kind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return respond(status_view(await _owned(request, kind)))

    return handler


def _image_file(f: FileRecord) -> ImageFile:
    return ImageFile(url=f.url, format=f.format, size_bytes=f.size_bytes, width=f.width,
                     height=f.height)


def _video_file(f: FileRecord) -> VideoFile:
    return VideoFile(url=f.url, format=f.format, size_bytes=f.size_bytes, width=f.width,
                     height=f.height, duration_seconds=f.duration_seconds)


def _metadata(job: JobView) -> ResultMetadata:
    return ResultMetadata(
        model_name=job.model_name,
        generation_time_seconds=job.generation_time_seconds,
        prompt=job.prompt,
        params=job.params,
        created_at=job.created_at,
        finished_at=job.finished_at,
        error_message=job.error_message,
    )


def result(kind: Kind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        job = await _owned(request, kind, with_files=True)
        if kind is Kind.IMAGE:
            return respond(ImageResult(
                job_id=job.id,
                status=job.status,
                images=[_image_file(f) for f in job.files],
                metadata=_metadata(job),
            ))
        return respond(VideoResult(
            job_id=job.id,
            status=job.status,
            videos=[_video_file(f) for f in job.files],
            metadata=_metadata(job),
        ))

    return handler


def _listed(job: JobView) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "status": job.status,
        "progress": job.progress,
        "message": status_view(job).message,
        "prompt": job.prompt,
        "params": job.params,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def gallery(kind: Kind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request)
        query = decode_query(dict(request.query), GalleryQuery)
        after = cursors.gallery_key(query.cursor) if query.cursor else None
        async with get_database(request.app).connection() as conn:
            # one row more than asked tells whether another page follows
            jobs = await owned_jobs.gallery(
                conn, principal.user_id, kind, limit=query.limit + 1, after=after
            )
        page, more = jobs[: query.limit], len(jobs) > query.limit
        next_cursor = cursors.encode(page[-1].created_at, page[-1].id) if more else None
        if kind is Kind.IMAGE:
            return respond(ImageGallery(
                generations=[
                    ImageGeneration(images=[_image_file(f) for f in job.files], **_listed(job))
                    for job in page
                ],
                next_cursor=next_cursor,
            ))
        return respond(VideoGallery(
            generations=[
                VideoGeneration(videos=[_video_file(f) for f in job.files], **_listed(job))
                for job in page
            ],
            next_cursor=next_cursor,
        ))

    return handler


def cancel(kind: Kind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request)
        job_id = request.match_info["id"]
        done = await job_usecases.cancel(get_database(request.app), job_id, principal.user_id, kind)
        if isinstance(done, job_usecases.NotCancelled):
            if done.status is None:
                raise NotFound(JOB_NOT_FOUND)
            raise Conflict(f"The job is already {done.status.value}.")
        job, applied, view = done.job, done.applied, done.view
        metrics.JOB_DURATION.labels(kind=kind.value, status=Status.CANCELLED.value).observe(
            (view.updated_at - job.created_at) / dt.timedelta(seconds=1)
        )
        log.info("job_cancelled", job_id=job.id, kind=kind.value, seq=applied.seq)
        return respond(status_view(view))

    return handler
