"""Ordering: one job's webhooks permuted and duplicated, delivered to a served gateway, end
in the state the in-order sequence gives.

Each example takes fresh jobs in the one database of the test: one gets the backend's
sequence in order, once; the other the same deliveries in a drawn order, some repeated
under the same `webhook-id` (the sender retrying) and some under a new one (the backend
sending an event twice). A completed job ends identical to the in-order one: status,
progress, message, model, files, notifications. A failed job ends with the same status,
error, no files and the same one notification; its progress is the progress reached when
the failure arrived (a failure freezes it; an older event arriving after it is stale), so
it equals the in-order progress exactly when the failure came after them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import WEBHOOK_KEY
from tests.reliability.conftest import Figures
from tests.reliability.served import Served, served
from tests.signing import sign

ROUTES = {"image": "/api/webhooks/image-completion", "video": "/api/webhooks/video-completion"}
EXAMPLES = 120
_ORDERS: set[tuple[Any, ...]] = set()


def files(kind: str) -> dict[str, Any]:
    if kind == "image":
        return {"images": [
            {"file_path": f"images/x/{n}.png", "url": f"https://cdn/x/{n}.png",
             "description": "a fox", "format": "png", "size_bytes": 1000 + n,
             "dimensions": "1024x768"} for n in range(2)]}
    return {"videos": [{"file_path": "videos/x/v.mp4", "url": "https://cdn/x/v.mp4",
                        "format": "MP4", "size_bytes": 1, "duration_seconds": 8.0,
                        "dimensions": "1280x720"}]}


def sequence(kind: str, job_id: str, fails: bool) -> list[dict[str, Any]]:
    """What the backend sends for one job, in order."""
    steps: list[dict[str, Any]] = [
        {"job_id": job_id, "status": status, "progress": value, "message": status}
        for status, value in (("initializing", 25), ("generating", 60), ("saving", 90))
    ]
    if fails:
        return [*steps[:2], {"job_id": job_id, "status": "failed", "message": "failed",
                             "error_message": "Quota API dépassé"}]
    return [*steps, {
        "job_id": job_id, "status": "completed", "progress": 100, "message": "done",
        "data": {**files(kind), "metadata": {"model_name": "gemini-2.5-flash-image",
                                             "generation_time_seconds": 12.5}},
    }]


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[tuple[Served, asyncpg.Pool]]:
    async with served(database_url) as gw:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            yield gw, pool
        finally:
            await pool.close()


async def new_job(pool: asyncpg.Pool, kind: str) -> str:
    job_id = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, status)"
        " VALUES ($1, $2, 'user_order', 'a fox', 'a fox', 'QUEUED')", job_id, kind)
    return job_id


async def deliver(session: aiohttp.ClientSession, gw: Served, kind: str,
                  payload: dict[str, Any], msg_id: str) -> str:
    body = msgspec.json.encode(payload)
    headers = sign(body, WEBHOOK_KEY, msg_id, int(time.time()))
    async with asyncio.timeout(30), session.post(f"{gw.base}{ROUTES[kind]}", data=body,
                                                 headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        outcome: str = (await resp.json())["outcome"]
        return outcome


async def final_state(pool: asyncpg.Pool, job_id: str) -> dict[str, Any]:
    job = await pool.fetchrow(
        "SELECT status::text, progress, message, error_message, model_name,"
        " generation_time_seconds, finished_at IS NOT NULL AS finished FROM jobs WHERE id = $1",
        job_id)
    job_files = await pool.fetch(
        "SELECT position, url, format, size_bytes, width, height, duration_seconds,"
        " description FROM job_files WHERE job_id = $1 ORDER BY position", job_id)
    notes = await pool.fetch(
        "SELECT type, title, message, metadata::text FROM notifications WHERE job_id = $1"
        " ORDER BY id", job_id)
    return {
        "job": dict(job),
        "files": [tuple(f) for f in job_files],
        "notifications": [(n["type"], n["title"], n["message"],
                           json.loads(n["metadata"].replace(job_id, "JOB"))) for n in notes],
    }


@st.composite
def orders(draw: st.DrawFn, length: int) -> list[tuple[int, str]]:
    """Every step once in any order, plus up to 6 repeats anywhere: "same" under the step's
    webhook-id (the sender retrying), "new" under another (the backend sending it twice)."""
    order = [(step, "first") for step in draw(st.permutations(range(length)))]
    for _ in range(draw(st.integers(0, 6))):
        repeat = (draw(st.integers(0, length - 1)), draw(st.sampled_from(["same", "new"])))
        order.insert(draw(st.integers(0, len(order))), repeat)
    return order


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["image", "video"]), fails=st.booleans(),
       concurrent=st.booleans())
async def test_any_order_and_repetition_ends_in_the_in_order_state(
    gateway: tuple[Served, asyncpg.Pool], figures: Figures, data: st.DataObject, kind: str,
    fails: bool, concurrent: bool,
) -> None:
    gw, pool = gateway
    reference, job_id = await new_job(pool, kind), await new_job(pool, kind)
    in_order = sequence(kind, reference, fails)
    steps = sequence(kind, job_id, fails)
    sends = data.draw(orders(len(steps)))
    # a failure freezes the progress reached when it arrives, so a failing job's
    # deliveries go one by one, where that moment is known
    concurrent = concurrent and not fails
    ids = {n: f"msg_{uuid.uuid4().hex}" for n in range(len(steps))}
    deliveries = [(steps[step], ids[step] if how != "new" else f"msg_{uuid.uuid4().hex}")
                  for step, how in sends]

    async with aiohttp.ClientSession() as session:
        for payload in in_order:
            outcome = await deliver(session, gw, kind, payload, f"msg_{uuid.uuid4().hex}")
            assert outcome == "applied"
        if concurrent:
            outcomes = await asyncio.gather(
                *(deliver(session, gw, kind, p, m) for p, m in deliveries))
        else:
            outcomes = [await deliver(session, gw, kind, p, m) for p, m in deliveries]

    expected = await final_state(pool, reference)
    got = await final_state(pool, job_id)
    if fails:
        failure = len(steps) - 1
        first_failure = next(i for i, (step, _) in enumerate(sends) if step == failure)
        frozen = max([in_order[step]["progress"] for step, _ in sends[:first_failure]] + [0])
        assert got["job"]["progress"] == frozen
        assert frozen <= expected["job"]["progress"]
        expected["job"]["progress"] = frozen
    assert got == expected
    assert outcomes.count("applied") >= 1
    assert set(outcomes) <= {"applied", "duplicate", "stale"}
    # a webhook-id seen before is always answered duplicate, and only then
    if not concurrent:
        seen: set[str] = set()
        for (_, msg_id), outcome in zip(deliveries, outcomes, strict=True):
            assert (outcome == "duplicate") == (msg_id in seen)
            seen.add(msg_id)

    tally = figures.values
    tally["examples"] = tally.get("examples", 0) + 1
    _ORDERS.add((kind, fails, tuple(sends)))
    tally["distinct delivery orders"] = len(_ORDERS)
    tally["deliveries"] = tally.get("deliveries", 0) + len(sends) + len(in_order)
    tally["examples delivered concurrently"] = tally.get("examples delivered concurrently",
                                                         0) + concurrent
    tally["examples ending in a failure"] = tally.get("examples ending in a failure", 0) + fails
    answers = tally.setdefault("answers to the permuted deliveries", {})
    for outcome in outcomes:
        answers[outcome] = answers.get(outcome, 0) + 1
