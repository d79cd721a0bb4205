"""A simulated generator backend: the Flask backend's routes, answers and webhooks.

It answers `POST /api/{images,videos}/generate` like the Flask backend does, then sends the
webhook sequence of seeds/004 (initializing, generating, saving, then completed or failed),
signed with Standard Webhooks (or the legacy `X-Webhook-Secret` header), and serves real
files at the URLs it reports. Behaviours reproduce the real backend's failure modes:

- `honest`: uses the job_id it was given, sends `user_id` and `original_prompt`;
- `own-uuid`: ignores `job_id` and answers (and sends webhooks under) its own UUID;
- `lost-answer`: starts the job, then drops the connection before answering; a retry with
  the same Idempotency-Key is answered with the job id the caller sent, so with `own-uuid`
  the backend's own id never reaches the caller (its webhooks become orphans);
- `no-hints`: omits `user_id` and `original_prompt` (only the files' description is left);
- `duplicates`: sends every webhook three times with the same webhook-id;
- `out-of-order`: sends the sequence shuffled;
- `fail`: ends with `failed` and an error message;
- `slow`: answers late and spaces the webhooks out.

Behaviours combine with `+` (`own-uuid+no-hints`). Each request takes the behaviour named
in its `X-Simulate-Mode` header, else a `[sim:MODE]` marker in its prompt, else the one the
configured plan gives its prompt, else the next of the configured mix, in turn. The
backend's own state is in memory: it is a test double.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from gateway.settings import webhook_key
from gateway.simulator.media import png_size, prompt_colour, sample_video, solid_png
from gateway.webhooks.signing import signature_headers

log = structlog.get_logger(__name__)

MODES = (
    "honest",
    "own-uuid",
    "lost-answer",
    "no-hints",
    "duplicates",
    "out-of-order",
    "fail",
    "slow",
)
_MARKER = re.compile(r"\[sim:([a-z+-]+)\]")
_encode = msgspec.json.Encoder().encode

IMAGE_MODEL = "gemini-2.5-flash-image"
VIDEO_MODEL = "veo-2.0-generate-001"


class ModeError(ValueError):
    """A behaviour name that the simulator does not know."""


def parse_mode(text: str) -> frozenset[str]:
    flags = frozenset(part.strip() for part in text.split("+") if part.strip())
    unknown = flags - set(MODES)
    if not flags or unknown:
        raise ModeError(f"unknown behaviour {text!r}; known: {', '.join(MODES)}")
    return flags


def parse_mix(text: str) -> tuple[frozenset[str], ...]:
    """'honest,own-uuid+no-hints' -> the behaviours taken in turn."""
    return tuple(parse_mode(item) for item in text.split(",") if item.strip())


@dataclasses.dataclass(frozen=True, slots=True)
class SimulatorConfig:
    webhook_base: str
    webhook_secret: str | None = None
    legacy_secret: str | None = None
    mix: tuple[frozenset[str], ...] = (frozenset({"honest"}),)
    # prompt -> behaviour, for callers that script each job (the demo)
    plan: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    step_delay: float = 0.2
    send_attempts: int = 8


@dataclasses.dataclass(slots=True)
class SimJob:
    backend_id: str
    given_id: str | None
    kind: str
    prompt: str
    user_id: str | None
    params: dict[str, Any]
    behaviour: frozenset[str]
    cancelled: bool = False
    finished: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class SentWebhook:
    backend_id: str
    webhook_id: str
    status: str
    http_status: int | None
    outcome: str | None


class SimulatedBackend:
    def __init__(self, config: SimulatorConfig, *, public_url: str = "") -> None:
        self.config = config
        self.public_url = public_url.rstrip("/")
        self.jobs: dict[str, SimJob] = {}
        self.sent: list[SentWebhook] = []
        self.requests: list[dict[str, Any]] = []
        self._answers: dict[str, dict[str, Any]] = {}
        self._turn = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/api/images/generate", self._generate),
                web.post("/api/videos/generate", self._generate),
                web.post("/api/images/{job_id}/cancel", self._cancel),
                web.post("/api/videos/{job_id}/cancel", self._cancel),
                web.get("/files/{backend_id}/{name}", self._file),
                web.get("/healthz", self._health),
            ]
        )
        app.cleanup_ctx.append(self._session_ctx)
        return app

    async def _session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            yield
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._session.close()

    @property
    def busy(self) -> bool:
        """True while a webhook sequence is still being sent."""
        return bool(self._tasks)

    async def idle(self) -> None:
        """Wait until every webhook sequence started so far has been sent."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- routes -------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy", "service": "simulated-backend"})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        kind = "image" if request.path.startswith("/api/images") else "video"
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        if not isinstance(body, dict) or not str(body.get("prompt", "")).strip():
            return web.json_response({"error": "prompt is required"}, status=400)
        self.requests.append({"kind": kind, "headers": dict(request.headers), "body": body})
        key = request.headers.get("Idempotency-Key")
        if key and key in self._answers:
            return web.json_response(self._answers[key], status=202)

        behaviour = self._behaviour(request, str(body["prompt"]))
        if "slow" in behaviour:
            await asyncio.sleep(self.config.step_delay * 5)
        given = body.get("job_id")
        backend_id = str(uuid.uuid4())
        if isinstance(given, str) and given and "own-uuid" not in behaviour:
            backend_id = given
        job = SimJob(
            backend_id=backend_id,
            given_id=given if isinstance(given, str) else None,
            kind=kind,
            prompt=str(body["prompt"]),
            user_id=body.get("user_id"),
            params=body,
            behaviour=behaviour,
        )
        self.jobs[backend_id] = job
        answer = {
            "job_id": backend_id,
            "status": "pending",
            "message": "Génération démarrée",
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        if key:
            # a replayed answer echoes the caller's id: a lost own id stays lost
            self._answers[key] = {**answer, "job_id": job.given_id or backend_id}
        self._start(job)
        if "lost-answer" in behaviour and request.transport is not None:
            # the job runs, but the caller never hears about it
            request.transport.abort()
            raise asyncio.CancelledError
        return web.json_response(answer, status=202)

    async def _cancel(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            return web.json_response({"error": "job not found"}, status=404)
        job.cancelled = True
        return web.json_response({"job_id": job.backend_id, "status": "cancelled"})

    async def _file(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["backend_id"])
        if job is None:
            raise web.HTTPNotFound()
        if job.kind == "image":
            width, height = png_size(str(job.params.get("size", "1024x1024")))
            data = solid_png(width, height, prompt_colour(job.prompt))
            return web.Response(body=data, content_type="image/png")
        video, _, _ = sample_video(str(job.params.get("aspect_ratio", "16:9")))
        return web.Response(body=video, content_type="video/mp4")

    # -- behaviour and webhooks ---------------------------------------------------------

    def _behaviour(self, request: web.Request, prompt: str) -> frozenset[str]:
        header = request.headers.get("X-Simulate-Mode")
        if header:
            return parse_mode(header)
        marker = _MARKER.search(prompt)
        if marker:
            return parse_mode(marker.group(1))
        if prompt in self.config.plan:
            return self.config.plan[prompt]
        mix = self.config.mix
        return mix[next(self._turn) % len(mix)]

    def _start(self, job: SimJob) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: SimJob) -> None:
        sequence = self._sequence(job)
        if "out-of-order" in job.behaviour:
            random.Random(job.backend_id).shuffle(sequence)
        delay = self.config.step_delay * (3 if "slow" in job.behaviour else 1)
        for payload in sequence:
            await asyncio.sleep(delay)
            if job.cancelled:
                return
            copies = 3 if "duplicates" in job.behaviour else 1
            await self._send(job, payload, copies)
        job.finished = True

    def _sequence(self, job: SimJob) -> list[dict[str, Any]]:
        steps: list[tuple[str, int, str]] = [
            ("initializing", 25, "Initialisation du modèle..."),
            ("generating", 60, "Génération en cours..."),
            ("saving", 90, "Enregistrement des fichiers..."),
        ]
        if "fail" in job.behaviour:
            steps = steps[:2]
        payloads = [self._payload(job, status, progress, text) for status, progress, text in steps]
        if "fail" in job.behaviour:
            failed = self._payload(job, "failed", None, "La génération a échoué")
            failed["error_message"] = "Erreur lors de la génération: Quota API dépassé"
            payloads.append(failed)
        else:
            done = self._payload(job, "completed", 100, "Génération terminée")
            done["data"] = self._result(job)
            payloads.append(done)
        return payloads

    def _payload(
        self, job: SimJob, status: str, progress: int | None, message: str
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "job_id": job.backend_id,
            "status": status,
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
            "environment": "simulation",
            "message": message,
            "error_message": None,
        }
        if progress is not None:
            payload["progress"] = progress
        if "no-hints" not in job.behaviour:
            payload["user_id"] = job.user_id
            payload["original_prompt"] = job.prompt
        return payload

    def _result(self, job: SimJob) -> dict[str, Any]:
        base = f"{self.public_url}/files/{job.backend_id}"
        if job.kind == "image":
            width, height = png_size(str(job.params.get("size", "1024x1024")))
            png = solid_png(width, height, prompt_colour(job.prompt))
            fmt = str(job.params.get("format", "PNG")).upper()
            count = int(job.params.get("num_images", 1) or 1)
            files = [
                {
                    "file_path": f"images/{job.backend_id}/image_{n}.png",
                    "url": f"{base}/image_{n}.png",
                    "description": job.prompt,
                    "format": fmt,
                    "size_bytes": len(png),
                    "dimensions": f"{width}x{height}",
                }
                for n in range(1, count + 1)
            ]
            return {
                "job_id": job.backend_id,
                "images": files,
                "metadata": {"model_name": IMAGE_MODEL, "version": "1.0",
                             "generation_time_seconds": 12.5},
                "status": "completed",
            }
        video, width, height = sample_video(str(job.params.get("aspect_ratio", "16:9")))
        count = int(job.params.get("number_of_videos", 1) or 1)
        files = [
            {
                "file_path": f"videos/{job.backend_id}/video_{n}.mp4",
                "url": f"{base}/video_{n}.mp4",
                "description": job.prompt,
                "format": "MP4",
                "size_bytes": len(video),
                "duration_seconds": 8.0,
                "dimensions": f"{width}x{height}",
            }
            for n in range(1, count + 1)
        ]
        return {
            "job_id": job.backend_id,
            "videos": files,
            "metadata": {"model_name": VIDEO_MODEL, "generation_time_seconds": 48.0},
            "status": "completed",
        }

    def _headers(self, webhook_id: str, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.webhook_secret:
            key = webhook_key(self.config.webhook_secret)
            headers.update(signature_headers(key, webhook_id, int(time.time()), body))
        elif self.config.legacy_secret:
            headers["X-Webhook-Secret"] = self.config.legacy_secret
        return headers

    async def _send(self, job: SimJob, payload: dict[str, Any], copies: int) -> None:
        """POST one webhook (and its duplicates), retrying each until a 2xx, like a sender."""
        assert self._session is not None
        url = f"{self.config.webhook_base.rstrip('/')}/api/webhooks/{job.kind}-completion"
        body = _encode(payload)
        webhook_id = f"msg_{uuid.uuid4().hex}"
        for _ in range(copies):
            status: int | None = None
            outcome: str | None = None
            for attempt in range(self.config.send_attempts):
                try:
                    async with self._session.post(
                        url, data=body, headers=self._headers(webhook_id, body)
                    ) as resp:
                        status = resp.status
                        if resp.status < 300:
                            outcome = (await resp.json()).get("outcome")
                            break
                except (aiohttp.ClientError, TimeoutError):
                    status = None
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            self.sent.append(
                SentWebhook(job.backend_id, webhook_id, payload["status"], status, outcome)
            )
            log.info(
                "simulated_webhook_sent",
                backend_job_id=job.backend_id,
                webhook_status=payload["status"],
                http_status=status,
                outcome=outcome,
            )
