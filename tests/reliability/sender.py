"""The generator backend's side of the load and crash scenarios: jobs it works on, the signed
webhooks it reports them with, a sender that posts them (retrying until a 2xx when asked),
and the gateway processes they go to.

A webhook's body and id are made once: a duplicate is the same id and the same bytes, as a
sender's redelivery is. Each try is signed when it is sent, as a Standard Webhooks sender
signs a retry (a fresh timestamp over the same id and body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import msgspec

from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.store import Database
from tests.conftest import WEBHOOK_KEY
from tests.procs import Proc, free_port, serve_env, start, wait_ready
from tests.signing import sign

ROUTES = {Kind.IMAGE: "/api/webhooks/image-completion",
          Kind.VIDEO: "/api/webhooks/video-completion"}

# The real backend's sequence for one job (see the simulated backend): three progress
# reports, then the end.
PROGRESS = (("initializing", 25), ("generating", 60), ("saving", 90))


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    id: str
    kind: Kind
    user_id: str
    prompt: str
    files: int  # files its completion reports; 0: the job fails

    @property
    def fails(self) -> bool:
        return self.files == 0

    @property
    def final_status(self) -> str:
        return "FAILED" if self.fails else "COMPLETED"

    @property
    def notification_type(self) -> str:
        return f"{self.kind.label}_{self.final_status}"


@dataclasses.dataclass(frozen=True, slots=True)
class Webhook:
    job: Job
    msg_id: str
    status: str  # the backend's word: initializing ... completed / failed
    body: bytes

    @property
    def route(self) -> str:
        return ROUTES[self.job.kind]

    @property
    def dedupe_key(self) -> str:
        return f"id:{self.msg_id}"


def make_jobs(count: int, prefix: str) -> list[Job]:
    """Image and video jobs of 20 users; every tenth fails, the others report 1-4 files."""
    jobs = []
    for n in range(count):
        kind = Kind.VIDEO if n % 4 == 3 else Kind.IMAGE
        files = 0 if n % 10 == 9 else 1 + n % (4 if kind is Kind.IMAGE else 2)
        jobs.append(Job(f"{prefix}-{n:05d}", kind, f"user_{n % 20:02d}",
                        f"prompt {n} of {prefix}", files))
    return jobs


def webhooks_of(job: Job) -> list[Webhook]:
    """The job's four webhooks, in the order the backend sends them."""
    base = {"job_id": job.id, "user_id": job.user_id, "original_prompt": job.prompt}
    payloads: list[dict[str, Any]] = [
        {**base, "status": word, "progress": progress, "message": f"{word} {progress}%"}
        for word, progress in PROGRESS
    ]
    if job.fails:
        payloads.append({**base, "status": "failed", "progress": 90,
                         "error_message": f"generation of {job.id} was refused"})
    else:
        payloads.append({**base, "status": "completed", "progress": 100,
                         "message": "done", "data": _files(job)})
    return [Webhook(job, f"msg_{job.id}_{p['status']}", p["status"], msgspec.json.encode(p))
            for p in payloads]


def _files(job: Job) -> dict[str, Any]:
    if job.kind is Kind.IMAGE:
        images = [{"file_path": f"images/{job.id}/image_{i}.png",
                   "url": f"https://cdn.test/images/{job.id}/image_{i}.png",
                   "description": job.prompt, "format": "PNG", "size_bytes": 524_288 + i,
                   "dimensions": "1024x1024"} for i in range(1, job.files + 1)]
        return {"images": images, "metadata": {"model_name": "gemini-2.5-flash-image",
                                               "generation_time_seconds": 12.5}}
    videos = [{"file_path": f"videos/{job.id}/video_{i}.mp4",
               "url": f"https://cdn.test/videos/{job.id}/video_{i}.mp4", "format": "MP4",
               "size_bytes": 4_194_304 + i, "duration_seconds": 8.0,
               "dimensions": "1280x720"} for i in range(1, job.files + 1)]
    return {"videos": videos, "metadata": {"model_name": "veo-3.0-generate",
                                           "generation_time_seconds": 61.0}}


async def insert_jobs(db: Database, jobs: Sequence[Job]) -> None:
    """The jobs as the backend accepted them (QUEUED), in one statement."""
    await db.execute(
        """
        INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, status)
        SELECT id, kind, user_id, prompt, prompt_norm, 'QUEUED'
        FROM unnest($1::text[], $2::job_kind[], $3::text[], $4::text[], $5::text[])
            AS j(id, kind, user_id, prompt, prompt_norm)
        """,
        [j.id for j in jobs], [j.kind.value for j in jobs], [j.user_id for j in jobs],
        [j.prompt for j in jobs], [normalize(j.prompt) for j in jobs],
    )


@dataclasses.dataclass(slots=True)
class Answer:
    """How one delivery of a webhook ended, after however many tries."""

    webhook: Webhook
    status: int | None = None  # None: no answer within the deadline
    outcome: str | None = None
    tries: int = 0
    seconds: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Sender:
    """Posts webhooks to gateway processes; with `retry`, tries the next process after a
    refused or broken connection or a 5xx, backing off, until a 2xx or `deadline` seconds."""

    def __init__(self, session: aiohttp.ClientSession, ports: Sequence[int], *,
                 retry: bool, deadline: float = 60.0, attempt_timeout: float = 20.0) -> None:
        self.session = session
        self.ports = list(ports)
        self.retry = retry
        self.deadline = deadline
        self.attempt_timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        self.statuses: Counter[int] = Counter()  # every HTTP answer, retries included
        self.errors: Counter[str] = Counter()  # every try that got no HTTP answer
        self.latencies: list[float] = []  # seconds of every try that got an HTTP answer
        self.in_flight: Counter[int] = Counter()  # by port
        self.answered: Counter[int] = Counter()  # 2xx by port
        self._changed = asyncio.Event()  # set whenever a try starts or ends

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Until `condition` (of the counters above) holds; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def send(self, webhook: Webhook, target: int) -> Answer:
        """Deliver `webhook`, first to process `target` (an index into the ports)."""
        answer = Answer(webhook)
        started = time.monotonic()
        backoff = 0.02
        while True:
            port = self.ports[target % len(self.ports)]
            answer.tries += 1
            status, outcome, failure = await self._try(webhook, port)
            if status is not None:
                answer.status, answer.outcome = status, outcome
                if answer.ok:
                    break
            if failure is not None:
                answer.failures.append(failure)
            retryable = status is None or status >= 500
            if not (self.retry and retryable) or time.monotonic() - started > self.deadline:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
            target += 1
        answer.seconds = time.monotonic() - started
        return answer

    async def _try(self, webhook: Webhook, port: int) -> tuple[int | None, str | None,
                                                                str | None]:
        headers = sign(webhook.body, WEBHOOK_KEY, webhook.msg_id, int(time.time()))
        url = f"http://127.0.0.1:{port}{webhook.route}"
        self.in_flight[port] += 1
        self._changed.set()
        began = time.perf_counter()
        try:
            async with self.session.post(url, data=webhook.body, headers=headers,
                                         timeout=self.attempt_timeout) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[type(exc).__name__] += 1
            return None, None, f"{port}: {type(exc).__name__}"
        finally:
            self.in_flight[port] -= 1
            self._changed.set()
        self.latencies.append(time.perf_counter() - began)
        self.statuses[resp.status] += 1
        if not 200 <= resp.status < 300:
            return resp.status, None, f"{port}: HTTP {resp.status} {raw[:200]!r}"
        self.answered[port] += 1
        outcome = msgspec.json.decode(raw).get("outcome")
        return resp.status, outcome, None

    def percentile_ms(self, fraction: float) -> float:
        """The latency of one try at `fraction` (0.5, 0.99), in milliseconds."""
        if len(self.latencies) < 2:
            return 1000 * (self.latencies[0] if self.latencies else 0.0)
        cuts = statistics.quantiles(self.latencies, n=1000, method="inclusive")
        return 1000 * cuts[round(fraction * 1000) - 1]


class Gateways:
    """Independent `serve` processes on ports of their own, sharing one database. They log
    at warning: an error (and any traceback) still shows, while the two info lines of each
    of thousands of requests are not piped through this process, which is also the sender."""

    def __init__(self, database_url: str, count: int) -> None:
        self.env = serve_env(
            database_url,
            DB_POOL_MIN="2",
            DB_POOL_MAX="8",
            LOG_LEVEL="warning",
        )
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[Proc | None] = [None] * count
        self.killed: list[Proc] = []
        self.peak_rss_mb: list[float] = []  # of each process that was stopped, not killed

    def _start(self, index: int) -> Proc:
        proc = start(["serve", "--no-migrate"], {**self.env, "PORT": str(self.ports[index])})
        self.procs[index] = proc
        return proc

    async def start_all(self, timeout: float = 60.0) -> None:
        for index in range(len(self.ports)):
            self._start(index)
        await asyncio.gather(*(wait_ready(port, timeout=timeout) for port in self.ports))

    async def kill(self, index: int, timeout: float = 10.0) -> None:
        """SIGKILL process `index` and wait until it is gone."""
        proc = self.procs[index]
        assert proc is not None
        proc.popen.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while proc.popen.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {proc.popen.pid} outlived SIGKILL")
            await asyncio.sleep(0.01)
        self.killed.append(proc)
        self.procs[index] = None

    async def restart(self, index: int, timeout: float = 60.0) -> float:
        """Start process `index` again on its port; seconds until it is ready."""
        self._start(index)
        return await wait_ready(self.ports[index], timeout=timeout)

    def stop_all(self) -> list[tuple[int, str]]:
        """SIGTERM every live process; (exit code, stderr) of each."""
        live = [proc for proc in self.procs if proc is not None]
        self.peak_rss_mb = [peak for proc in live if (peak := _peak_rss_mb(proc)) is not None]
        results = [proc.stop() for proc in live]
        for proc in self.killed:
            proc.stop()  # reaps it and closes its stderr
        return results


def _peak_rss_mb(proc: Proc) -> float | None:
    """The process's peak resident set (Linux VmHWM), while it runs."""
    try:
        with open(f"/proc/{proc.popen.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
