"""Admission toward the backend: at most BACKEND_MAX_IN_FLIGHT_* jobs of a kind handed over
and not terminal, fair across users, paused by the backend's 429 with Retry-After."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.delivery import get_dispatcher
from gateway.jobs.kinds import Kind
from gateway.settings import Settings
from gateway.store import Database
from tests.backend import ScriptedBackend, eventually, status
from tests.conftest import WEBHOOK_KEY
from tests.signing import signed
from tests.test_api_jobs import create
from tests.test_reconcile import reconcile
from tests.test_webhooks_ingest import ROUTES, completed

Client = TestClient[web.Request, web.Application]
UNLIMITED_USERS = {"user_max_active_image_jobs": 0, "user_max_image_jobs_per_hour": 0}


@pytest.fixture
async def backend(aiohttp_server: Any) -> ScriptedBackend:
    double = ScriptedBackend()  # accepts every job and never sends a webhook
    await double.start(aiohttp_server)
    return double


@pytest.fixture
def start_gateway(
    aiohttp_client: Callable[..., Awaitable[Client]],
    make_settings: Callable[..., Settings],
    backend: ScriptedBackend,
) -> Callable[..., Awaitable[Client]]:
    async def start(**overrides: Any) -> Client:
        settings = make_settings(backend_url=backend.url, backend_timeout_seconds=1.0,
                                 delivery_retry_schedule=(0.05, 0.1, 0.2),
                                 **UNLIMITED_USERS, **overrides)
        return await aiohttp_client(create_app(settings))

    return start


async def submit(client: Client, sub: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        resp = await create(client, "images", {"prompt": f"{sub} #{i}"}, sub=sub)
        assert resp.status == 202
        ids.append((await resp.json())["job_id"])
    return ids


async def complete(client: Client, job_id: str) -> None:
    body, headers = signed(completed(job_id), WEBHOOK_KEY, f"done-{job_id}")
    resp = await client.post(ROUTES[Kind.IMAGE], data=body, headers=headers)
    assert resp.status == 200, await resp.text()


async def handed_over(backend: ScriptedBackend, count: int) -> None:
    await eventually(lambda: _at_least(backend, count), timeout=10, every=0.05)


async def _at_least(backend: ScriptedBackend, count: int) -> bool:
    return len(backend.accepted) >= count


async def test_the_backend_sees_exactly_the_cap_and_one_more_after_each_completion(
    start_gateway: Callable[..., Awaitable[Client]], backend: ScriptedBackend, db: Database
) -> None:
    client = await start_gateway(backend_max_in_flight_image_jobs=2)
    ids = await submit(client, "user_a", 5)
    await handed_over(backend, 2)
    await asyncio.sleep(2.5)  # longer than a dispatcher's poll: nothing more goes
    assert len(backend.accepted) == 2
    waiting = await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'PENDING'")
    assert waiting == 3
    scrape = await (await client.get("/metrics")).text()
    assert 'sorami_admission_waiting{kind="image"} 3.0' in scrape
    assert 'sorami_admission_waiting{kind="video"} 0.0' in scrape
    age = next(line for line in scrape.splitlines()
               if line.startswith('sorami_admission_oldest_waiting_age_seconds{kind="image"}'))
    assert 2.0 <= float(age.split()[-1]) < 60

    first = next(iter(backend.accepted))
    await complete(client, first)
    await handed_over(backend, 3)
    await asyncio.sleep(2.5)
    assert len(backend.accepted) == 3
    assert list(backend.accepted) == ids[:3]  # oldest first


async def test_one_users_burst_does_not_hold_back_another_users_one_job(
    start_gateway: Callable[..., Awaitable[Client]], backend: ScriptedBackend, db: Database
) -> None:
    client = await start_gateway(backend_max_in_flight_image_jobs=2)
    burst = await submit(client, "user_a", 22)
    await handed_over(backend, 2)
    (other,) = await submit(client, "user_b", 1)
    for n, job_id in enumerate(burst[:2], start=3):
        await complete(client, job_id)
        await handed_over(backend, n)
    # within the next two handovers
    assert other in list(backend.accepted)[2:4]


async def test_the_reconciler_times_out_a_silent_handed_over_job_never_one_waiting_its_turn(
    start_gateway: Callable[..., Awaitable[Client]], backend: ScriptedBackend, db: Database,
    database_url: str,
) -> None:
    client = await start_gateway(backend_max_in_flight_image_jobs=1)
    first, *waiting = await submit(client, "user_a", 3)
    await handed_over(backend, 1)

    async def queued() -> bool:
        return bool(await db.fetchval("SELECT status = 'QUEUED' FROM jobs WHERE id = $1",
                                      first))

    await eventually(queued, timeout=10, every=0.05)  # the delivery's outcome is written
    # two hours on: the handed-over job never heard from the backend, the others waited
    await db.execute("UPDATE jobs SET updated_at = updated_at - interval '2 hours'")

    result = await reconcile(database_url, image_timeout_seconds=3600.0)

    assert result.counts["timed_out"] == {"image": 1, "video": 0}
    statuses = dict(await db.fetch("SELECT id, status::text FROM jobs"))
    assert statuses[first] == "TIMED_OUT"
    # the waiting ones are not: one may be handed over already, woken by the timeout
    assert {statuses[job_id] for job_id in waiting} <= {"PENDING", "QUEUED"}
    # the timed-out job's slot goes to the oldest waiting one
    await handed_over(backend, 2)
    assert list(backend.accepted) == [first, waiting[0]]


async def test_a_job_ended_by_webhook_or_by_the_reconciler_wakes_the_dispatchers_at_once(
    start_gateway: Callable[..., Awaitable[Client]], backend: ScriptedBackend, db: Database,
    database_url: str,
) -> None:
    client = await start_gateway(backend_max_in_flight_image_jobs=1)
    dispatcher = get_dispatcher(client.app)
    dispatcher.poll_seconds = 3600.0  # no poll: only a wake-up hands the next job over
    first, second, third = await submit(client, "user_a", 3)
    await handed_over(backend, 1)
    # (each create wakes the dispatchers too: let those wake-ups pass first)
    await asyncio.sleep(0.5)

    await complete(client, first)  # this process's webhook
    await handed_over(backend, 2)

    async def queued() -> bool:
        return bool(await db.fetchval("SELECT status = 'QUEUED' FROM jobs WHERE id = $1",
                                      second))

    await eventually(queued, timeout=10, every=0.05)
    await db.execute("UPDATE jobs SET updated_at = updated_at - interval '2 hours' "
                     "WHERE id = $1", second)
    await reconcile(database_url, image_timeout_seconds=3600.0)  # another process's timeout
    await handed_over(backend, 3)
    assert list(backend.accepted) == [first, second, third]


async def test_a_backend_429_with_retry_after_pauses_every_handover_of_its_kind(
    start_gateway: Callable[..., Awaitable[Client]], backend: ScriptedBackend, db: Database
) -> None:
    client = await start_gateway(backend_max_in_flight_image_jobs=2)
    backend.default = status(429, retry_after="3")
    (first,) = await submit(client, "user_a", 1)
    await eventually(lambda: _paused(db), timeout=10, every=0.05)
    refused_at = time.monotonic()
    backend.default = status(202)
    (second,) = await submit(client, "user_b", 1)
    await eventually(lambda: _called(backend, second), timeout=15, every=0.05)
    waited = backend.calls_for(second)[0].started - refused_at
    assert 2.5 <= waited <= 3 + 2 + 1  # the pause, at most a poll, some slack
    scrape = await (await client.get("/metrics")).text()
    assert 'sorami_backend_pauses_total{kind="image"}' in scrape
    await handed_over(backend, 2)
    assert first in backend.accepted


async def _paused(db: Database) -> bool:
    return bool(await db.fetchval(
        "SELECT count(*) FROM backend_pauses WHERE kind = 'image' AND paused_until > now()"))


async def _called(backend: ScriptedBackend, job_id: str) -> bool:
    return bool(backend.calls_for(job_id))


async def test_without_a_cap_a_job_is_handed_over_at_once(
    start_gateway: Callable[..., Awaitable[Client]], backend: ScriptedBackend, db: Database
) -> None:
    client = await start_gateway()
    await submit(client, "user_a", 3)
    await handed_over(backend, 3)
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE due_at = 'infinity'") == 0
