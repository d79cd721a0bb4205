"""The outbox under three server processes and 1,000 jobs, with a generator backend that
misbehaves in a planned mix: 5xx, 429 with Retry-After (short: waited out within an attempt;
long: the schedule waits for it), hangs past the client timeout, dropped connections, and
answers lost after the job was taken.

Every job is delivered and QUEUED once; no job is ever sent twice at the same moment; and
every wait between two calls of one job is the one the delivery rules give (the quick tries
of an attempt, `DELIVERY_RETRY_SCHEDULE` with its jitter between attempts, and never less
than the backend's Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from gateway.delivery.dispatcher import (
    INLINE_BACKOFF,
    INLINE_MAX_WAIT,
    INLINE_TRIES,
    JITTER,
    POLL_SECONDS,
)
from gateway.store import Database
from tests.backend import ACCEPT, Call, Reply, ScriptedBackend, eventually, status
from tests.procs import Proc, free_port, serve_env, start, wait_ready
from tests.reliability.cluster import migrated_database, throwaway_cluster
from tests.reliability.conftest import Figures
from tests.tokens import bearer, hs256_token

JOBS = 1_000
PROCESSES = 3
CREATORS = 24
TIMEOUT = 1.0
SCHEDULE = (0.2, 0.4, 0.8, 1.0, 1.0, 1.0)
# Retry-After the quick tries wait out, and one longer than INLINE_MAX_WAIT, which ends the
# attempt and outlasts the schedule's first wait
SHORT_RETRY_AFTER = 1
LONG_RETRY_AFTER = 3
# A measured wait may fall short of the planned one by timer and clock granularity only...
EARLY_TOLERANCE = 0.01
# ...and after a hang by the time the request took to reach the backend too: the caller's
# timeout starts before the backend sees the request, so its end is known only within that.
HANG_TOLERANCE = 0.1
# A wait may exceed the planned one by the time a due row queues for a dispatcher: rows are
# claimed oldest due first, at most MAX_IN_FLIGHT per process, so under this burst a retry
# queues like a new job does (measured: a new job's wait for its first call), plus the poll
# a dispatcher with rows in flight may sleep before it claims again, plus a second.
LATE_TOLERANCE = POLL_SECONDS + 1.0

HANG = Reply(hang=math.inf)
DROP = Reply(drop=True)
LOST = Reply(lose_answer=True)
SHORT_429 = status(429, retry_after=str(SHORT_RETRY_AFTER))
LONG_429 = status(429, retry_after=str(LONG_RETRY_AFTER))

# What the backend does to a job's first calls, in turn over the jobs; then it accepts.
PLANS: list[tuple[Reply, ...]] = [
    (),
    (status(500),),
    (status(500), status(503), status(502)),  # all three quick tries: the schedule waits
    (SHORT_429,),
    (LONG_429,),
    (HANG,),
    (DROP,),
    (LOST,),
    (HANG, status(500), DROP, LOST),
    (status(503), SHORT_429, status(500), LONG_429, DROP),
    (LOST, LOST),
    (DROP, status(500), status(500), HANG, HANG, HANG, SHORT_429),
]


def fault_kind(reply: Reply) -> str:
    if reply.hang == math.inf:
        return "hang"
    if reply.drop:
        return "dropped connection"
    if reply.lose_answer:
        return "lost answer"
    if reply.status == 429:
        return f"429 Retry-After {reply.retry_after}"
    if reply.status >= 500:
        return "5xx"
    return "accepted"


@dataclasses.dataclass(frozen=True)
class Wait:
    """The wait the delivery rules give between two calls of one job."""

    low: float
    high: float
    between_attempts: bool


def planned_waits(replies: list[Reply]) -> tuple[list[Wait], int]:
    """The waits after each failed call of `replies`, and the number of attempts (claims)
    they take, as the dispatcher's rules give them."""
    waits: list[Wait] = []
    attempt, calls = 1, 0
    for reply in replies[:-1]:  # the last one is accepted
        calls += 1
        retry_after = float(reply.retry_after) if reply.retry_after else 0.0
        # a hang ends its attempt at the timeout: the schedule waits after it
        quick = (calls < INLINE_TRIES and retry_after <= INLINE_MAX_WAIT
                 and reply.hang != math.inf)
        if quick:
            base = INLINE_BACKOFF[min(calls, len(INLINE_BACKOFF)) - 1]
            waits.append(Wait(max(base, retry_after), max(base * (1 + JITTER), retry_after),
                              between_attempts=False))
            continue
        scheduled = SCHEDULE[attempt - 1]
        waits.append(Wait(max(scheduled * (1 - JITTER), retry_after),
                          max(scheduled * (1 + JITTER), retry_after), between_attempts=True))
        attempt, calls = attempt + 1, 0
    return waits, attempt


class PlannedBackend(ScriptedBackend):
    """Each job's misbehaviour, chosen by the number in its prompt on its first call (the
    job id is only known once the job is committed, and the first call follows at once)."""

    def __init__(self) -> None:
        super().__init__(default=self._planned)
        self.plan_of: dict[str, int] = {}
        self._left: dict[str, collections.deque[Reply]] = {}

    def _planned(self, call: Call) -> Reply:
        if call.job_id not in self._left:
            number = int(call.body["prompt"].rsplit(" ", 1)[1])
            self.plan_of[call.job_id] = number % len(PLANS)
            self._left[call.job_id] = collections.deque(PLANS[self.plan_of[call.job_id]])
        left = self._left[call.job_id]
        return left.popleft() if left else ACCEPT


async def create_jobs(ports: list[int]) -> dict[str, float]:
    """JOBS jobs through the client API, spread over the processes and a few users; the
    time.monotonic() each was answered 202 (committed), by job id."""
    numbers = iter(range(JOBS))
    job_ids: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def creator() -> None:
            for n in numbers:
                kind = "videos" if n % 4 == 3 else "images"
                url = f"http://127.0.0.1:{ports[n % len(ports)]}/api/{kind}/generate"
                headers = bearer(hs256_token(f"user_{n % 9}"))
                async with session.post(url, json={"prompt": f"reliability job {n}"},
                                        headers=headers) as resp:
                    assert resp.status == 202, await resp.text()
                    job_ids[(await resp.json())["job_id"]] = time.monotonic()

        await asyncio.gather(*(creator() for _ in range(CREATORS)))
    return job_ids


def ended(call: Call) -> float:
    """When the call ended for the caller: a hang when its timeout ran out (it hangs up then;
    the backend may notice a little later), any other call when the backend answered."""
    end = call.ended if call.ended is not None else math.inf
    return min(end, call.started + TIMEOUT) if call.reply == HANG else end


def most_overlapping(calls: list[Call]) -> int:
    """The most calls of one job in flight at one moment, from their start and end times."""
    edges = sorted([(c.started, 1) for c in calls] + [(ended(c), -1) for c in calls],
                   key=lambda e: (e[0], e[1]))
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A migrated database on a server of its own: three processes' pools and listeners
    need connections no other test run can take away."""
    with throwaway_cluster() as cluster:
        yield await migrated_database(cluster, "sorami")


async def test_three_processes_deliver_1000_jobs_of_a_faulty_backend_once_each_on_schedule(
    database_url: str, db: Database, aiohttp_server: Callable[..., Any], figures: Figures
) -> None:
    backend = PlannedBackend()
    await backend.start(aiohttp_server)
    env = serve_env(
        database_url,
        BACKEND_URL=backend.url,
        BACKEND_TIMEOUT_SECONDS=str(TIMEOUT),
        DELIVERY_RETRY_SCHEDULE=" ".join(f"{int(s * 1000)}ms" for s in SCHEDULE),
    )
    ports = [free_port() for _ in range(PROCESSES)]
    procs: list[Proc] = []
    try:
        for port in ports:
            procs.append(start(["serve", "--no-migrate"], {**env, "PORT": str(port)}))
        for proc, port in zip(procs, ports, strict=True):
            await wait_ready(port, timeout=30)
            await proc.wait_log('"event": "delivery_started"')

        began = time.monotonic()
        committed = await asyncio.wait_for(create_jobs(ports), 120)
        job_ids = list(committed)
        created = time.monotonic() - began

        async def drained() -> bool:
            left = await db.fetchval(
                "SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL")
            return bool(left == 0)

        await eventually(drained, timeout=150, every=0.1)
        drain = time.monotonic() - began
    finally:
        results = [proc.stop() for proc in procs]

    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert len(set(job_ids)) == JOBS

    # every job delivered, QUEUED once, by whichever process
    outbox_rows = {
        r["job_id"]: r for r in await db.fetch(
            "SELECT job_id, attempts, delivered_at, failed_at, last_error FROM outbox")
    }
    assert set(outbox_rows) == set(job_ids)
    failed = [r for r in outbox_rows.values() if r["failed_at"] is not None]
    assert not failed, failed[:3]
    assert await db.fetchval(
        "SELECT count(*) FROM jobs WHERE status = 'QUEUED' AND id = ANY($1::text[])", job_ids
    ) == JOBS
    assert await db.fetchval(
        "SELECT count(*) FROM job_events WHERE status = 'QUEUED' AND source = 'delivery'"
    ) == JOBS
    assert set(backend.accepted) == set(job_ids)
    delivered_by = [stderr.count('"event": "delivery_delivered"') for _, stderr in results]
    assert sum(delivered_by) == JOBS
    assert all(delivered_by), f"a process delivered nothing: {delivered_by}"

    # each job: its plan played out call by call, never two calls at once, waits on schedule
    calls_of: dict[str, list[Call]] = collections.defaultdict(list)
    for call in backend.calls:
        calls_of[call.job_id].append(call)
    overlapping = max(most_overlapping(calls) for calls in calls_of.values())
    wrong_calls, wrong_attempts, early = [], [], []
    margins: dict[str, list[float]] = collections.defaultdict(list)
    lateness: list[tuple[float, str, str, Wait]] = []
    for job_id in job_ids:
        calls = sorted(calls_of[job_id], key=lambda c: c.started)
        plan = PLANS[backend.plan_of[job_id]]
        if [c.reply for c in calls] != [*plan, ACCEPT]:
            wrong_calls.append((job_id, [c.reply for c in calls]))
            continue
        waits, attempts = planned_waits([c.reply for c in calls])
        if outbox_rows[job_id]["attempts"] != attempts:
            wrong_attempts.append((job_id, outbox_rows[job_id]["attempts"], attempts))
        for before, after, wait in zip(calls[:-1], calls[1:], waits, strict=True):
            gap = after.started - ended(before)
            margins[fault_kind(before.reply)].append(gap - wait.low)
            tolerance = HANG_TOLERANCE if before.reply == HANG else EARLY_TOLERANCE
            if gap < wait.low - tolerance:
                early.append((job_id, fault_kind(before.reply), round(gap, 3), wait))
            lateness.append((gap - wait.high, job_id, fault_kind(before.reply), wait))

    by_kind = collections.Counter(fault_kind(c.reply) for c in backend.calls)
    figures["jobs"] = JOBS
    figures["processes"] = PROCESSES
    figures["calls to the backend"] = len(backend.calls)
    figures["calls by fault kind"] = dict(sorted(by_kind.items()))
    figures["deliveries by process"] = delivered_by
    figures["max concurrent sends per job"] = overlapping
    figures["waits checked"] = sum(len(m) for m in margins.values())
    # the time a committed job waits for its first call: the dispatchers' queue
    queued = max(min(c.started for c in calls_of[j]) - committed[j] for j in job_ids)
    latest = max(lateness, key=lambda x: x[0])
    figures["min gap - planned minimum s, by the fault before"] = {
        kind: round(min(m), 3) for kind, m in sorted(margins.items())}
    figures["max gap - planned maximum s"] = latest[0]
    figures["max wait of a new job for its first call s"] = queued
    figures["create 1,000 jobs s"] = created
    figures["drain s (first create to outbox empty)"] = drain

    assert overlapping == 1
    # every call of a job under its one key: a job taken but unanswered is not made twice
    assert all(c.headers.get("Idempotency-Key") == c.job_id for c in backend.calls)
    assert not wrong_calls, wrong_calls[:3]
    assert not wrong_attempts, wrong_attempts[:5]
    assert not early, early[:5]
    assert latest[0] <= queued + LATE_TOLERANCE, latest
    # every kind of fault in the mix was met
    assert set(by_kind) == {fault_kind(r) for plan in PLANS for r in (*plan, ACCEPT)}
