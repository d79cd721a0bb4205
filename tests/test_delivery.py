"""Delivery from the outbox to a real (scripted) generator backend: each outcome, each retry."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.delivery import get_dispatcher
from gateway.delivery.backend import parse_retry_after
from gateway.delivery.dispatcher import INLINE_TRIES, MAX_IN_FLIGHT
from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.jobs.state import Event, Status
from gateway.settings import Secret, Settings
from gateway.store import Database, orphans, outbox
from gateway.store import jobs as store_jobs
from tests.backend import ACCEPT, Reply, ScriptedBackend, eventually, status
from tests.factories import insert_job

FAST = {"delivery_retry_schedule": (0.05, 0.1, 0.2), "backend_timeout_seconds": 0.5}

Client = TestClient[web.Request, web.Application]
StartGateway = Callable[..., Awaitable[Client]]


@pytest.fixture
async def backend(aiohttp_server: Any) -> ScriptedBackend:
    double = ScriptedBackend()
    await double.start(aiohttp_server)
    return double


@pytest.fixture
def gateway_settings(
    make_settings: Callable[..., Settings], backend: ScriptedBackend
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(**{"backend_url": backend.url, **FAST, **overrides})

    return make


@pytest.fixture
def start_gateway(
    aiohttp_client: Callable[..., Awaitable[Client]], gateway_settings: Callable[..., Settings]
) -> StartGateway:
    """The real app (its dispatcher included), served until the test ends or closes it."""

    async def start(**overrides: Any) -> Client:
        return await aiohttp_client(create_app(gateway_settings(**overrides)))

    return start


def request_body(job_id: str, kind: Kind, user_id: str, prompt: str) -> dict[str, Any]:
    """What the client API stores: the client's fields, then job_id and user_id."""
    if kind is Kind.IMAGE:
        fields: dict[str, Any] = {
            "prompt": prompt, "num_images": 1, "size": "1024x1024", "format": "PNG",
            "style": "photorealistic", "quality": "standard",
        }
    else:
        fields = {
            "prompt": prompt, "aspect_ratio": "16:9", "duration_seconds": 8,
            "number_of_videos": 1, "person_generation": "ALLOW_ALL",
        }
    return {**fields, "job_id": job_id, "user_id": user_id}


async def new_job(
    db: Database,
    *,
    kind: Kind = Kind.IMAGE,
    user_id: str = "user_a",
    prompt: str = "un chat mignon avec des lunettes de soleil",
    job_id: str | None = None,
) -> str:
    """A committed job and its generate row, as the create route leaves them.

    Its commit wakes the dispatcher at once: script the backend's replies for `job_id`
    before calling this, or the first call may meet the default reply.
    """
    job_id = await insert_job(db, kind=kind, user_id=user_id, prompt=prompt,
                              status=Status.PENDING, job_id=job_id)
    async with db.transaction() as conn:
        await outbox.enqueue(conn, job_id, "generate",
                             request_body(job_id, kind, user_id, prompt))
    return job_id


async def cancel_job(db: Database, job_id: str) -> None:
    """What the cancel route does: CANCELLED and a cancel row, in one transaction."""
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, job_id)
        assert job is not None
        await store_jobs.apply(conn, job, store_jobs.JobUpdate(event=Event(Status.CANCELLED),
                                                               source="user"))
        await outbox.enqueue(conn, job_id, "cancel", {"job_id": job_id, "user_id": job.user_id})


async def row(db: Database, job_id: str, action: str = "generate") -> asyncpg.Record:
    found = await db.fetchrow("SELECT * FROM outbox WHERE job_id = $1 AND action = $2",
                              job_id, action)
    assert found is not None
    return found


async def settle(db: Database, job_id: str, action: str = "generate",
                 timeout: float = 15.0) -> asyncpg.Record:
    async def settled() -> bool:
        r = await row(db, job_id, action)
        return r["delivered_at"] is not None or r["failed_at"] is not None

    await eventually(settled, timeout=timeout)
    return await row(db, job_id, action)


async def job(db: Database, job_id: str) -> asyncpg.Record:
    found = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert found is not None
    return found


def attempts(action: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "sorami_delivery_attempts_total", {"action": action, "outcome": outcome}
    )
    return value or 0.0


async def test_500_500_200_ends_queued_after_three_calls(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    retries, delivered = attempts("generate", "retry"), attempts("generate", "delivered")
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, status(500), status(500), ACCEPT)
    await new_job(db, job_id=job_id)

    settled = await settle(db, job_id)

    assert settled["delivered_at"] is not None
    assert settled["payload"] is None  # the request body is kept only until delivered
    assert (await job(db, job_id))["status"] == "QUEUED"
    calls = backend.calls_for(job_id)
    assert len(calls) == 3
    assert all(c.headers["Idempotency-Key"] == job_id for c in calls)
    assert calls[0].body == request_body(job_id, Kind.IMAGE, "user_a",
                                         "un chat mignon avec des lunettes de soleil")
    assert "Authorization" not in calls[0].headers  # no BACKEND_API_KEY set
    event = await db.fetchrow("SELECT status, source FROM job_events WHERE job_id = $1 "
                              "ORDER BY seq DESC LIMIT 1", job_id)
    assert event is not None
    assert (event["status"], event["source"]) == ("QUEUED", "delivery")
    assert attempts("generate", "retry") - retries == 2
    assert attempts("generate", "delivered") - delivered == 1


async def test_videos_go_to_the_video_route(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = await new_job(db, kind=Kind.VIDEO, prompt="a drone shot over Kyoto")
    await settle(db, job_id)
    [call] = backend.calls_for(job_id)
    assert call.kind == "videos"
    assert call.body["duration_seconds"] == 8
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_429_with_retry_after_is_not_called_again_before_it(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, status(429, retry_after="1"), ACCEPT)
    await new_job(db, job_id=job_id)

    await settle(db, job_id)

    first, second = backend.calls_for(job_id)
    assert second.started - first.started >= 1.0
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_a_retry_after_longer_than_the_schedule_postpones_the_next_attempt(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, status(503, retry_after="30"))
    await new_job(db, job_id=job_id)

    async def rescheduled() -> bool:
        r = await row(db, job_id)
        return r["attempts"] == 1 and r["lease_owner"] is None

    await eventually(rescheduled)
    wait = await db.fetchval(
        "SELECT EXTRACT(EPOCH FROM due_at - now()) FROM outbox WHERE job_id = $1", job_id)
    assert float(wait) > 25  # the schedule says 0.05 s; the backend said 30 s
    assert len(backend.calls_for(job_id)) == 1  # not retried within the attempt either
    assert (await row(db, job_id))["last_error"] == "HTTP 503"


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    later = email.utils.format_datetime(now + dt.timedelta(seconds=90), usegmt=True)
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(later, now=now) == 90.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-5", now=now) is None
    assert parse_retry_after(None) is None


async def test_a_hang_past_the_timeout_ends_the_attempt_and_the_next_one_delivers(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway(backend_timeout_seconds=0.3, delivery_retry_schedule=(0.5,))
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(hang=math.inf), ACCEPT)
    await new_job(db, job_id=job_id)

    settled = await settle(db, job_id)

    first, second = backend.calls_for(job_id)
    assert first.ended is not None
    assert first.ended <= second.started  # the first was given up before the second began
    # not a quick try of the same attempt: the second call waited for the schedule
    assert second.started - (first.started + 0.3) >= 0.5 * 0.8 - 0.01
    assert settled["attempts"] == 2
    assert backend.max_concurrent[job_id] == 1
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_a_hanging_backend_holds_a_slot_for_one_timeout_not_for_every_quick_try(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway(backend_timeout_seconds=0.3, delivery_retry_schedule=(5.0,))
    # every slot of the process taken by a call that hangs
    hanging = [str(uuid.uuid4()) for _ in range(MAX_IN_FLIGHT)]
    for job_id in hanging:
        backend.script(job_id, Reply(hang=math.inf), ACCEPT)
        await new_job(db, job_id=job_id)

    async def all_hanging() -> bool:
        return all(backend.calls_for(job_id) for job_id in hanging)

    await eventually(all_hanging)
    waiting = str(uuid.uuid4())
    await new_job(db, job_id=waiting)

    await settle(db, waiting)

    # a slot came back at a hung call's timeout: with quick tries after a hang, no slot
    # would have been free before some hanging job's third call
    assert [len(backend.calls_for(job_id)) for job_id in hanging] == [1] * MAX_IN_FLIGHT
    assert len(backend.calls_for(waiting)) == 1


async def test_400_fails_the_job_with_one_notification_after_exactly_one_call(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    failed = attempts("generate", "failed")
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, status(400, body={"error": "prompt rejected by the safety filter"}))
    await new_job(db, job_id=job_id)

    settled = await settle(db, job_id)

    assert len(backend.calls_for(job_id)) == 1
    expected = "the generator backend refused the job: 400 prompt rejected by the safety filter"
    assert settled["failed_at"] is not None
    assert settled["last_error"] == expected
    assert settled["payload"] is None
    failed_job = await job(db, job_id)
    assert (failed_job["status"], failed_job["error_message"]) == ("FAILED", expected)
    notes = await db.fetch("SELECT user_id, type, message FROM notifications")
    assert [(n["user_id"], n["type"], n["message"]) for n in notes] == [
        ("user_a", "IMAGE_FAILED", expected)]
    assert attempts("generate", "failed") - failed == 1


async def test_a_redirect_is_not_followed(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(status=307, body={"moved": True}))
    await new_job(db, job_id=job_id)

    settled = await settle(db, job_id)

    assert len(backend.calls) == 1  # the Location was not requested
    assert settled["last_error"] == (
        "the generator backend refused the job: 307 a redirect, which is not followed")
    assert (await job(db, job_id))["status"] == "FAILED"


async def test_an_answer_with_the_backends_own_id_records_the_alias_and_applies_its_orphans(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    backend_id = "c76c36ee-838d-4ecb-94ed-37018032c9fd"
    hints = orphans.OrphanHints(user_id="user_a", prompt="un chat",
                                prompt_norm=normalize("un chat"), file_count=1)
    early = [
        ("wh-1", {"job_id": backend_id, "status": "initializing", "progress": 10}),
        ("wh-2", {"job_id": backend_id, "status": "completed", "progress": 100,
                  "data": {"images": [{"url": "https://cdn.example/1.png", "format": "PNG",
                                       "dimensions": "1024x1024"}]}}),
    ]
    for key, body in early:  # webhooks that beat the backend's answer
        async with db.transaction() as conn:
            await orphans.lock_backend_id(conn, Kind.IMAGE, backend_id)
            await orphans.record(conn, Kind.IMAGE, backend_id, dedupe_key=key,
                                 event_status=str(body["status"]), payload=body, hints=hints)
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(own_id=backend_id))
    await new_job(db, job_id=job_id)

    await settle(db, job_id)

    alias = await db.fetchrow("SELECT job_id, source FROM job_aliases WHERE backend_job_id = $1",
                              backend_id)
    assert alias is not None
    assert (alias["job_id"], alias["source"]) == (job_id, "delivery")
    done = await job(db, job_id)
    assert (done["status"], done["progress"]) == ("COMPLETED", 100)
    statuses = await db.fetch("SELECT status FROM job_events WHERE job_id = $1 ORDER BY seq",
                              job_id)
    assert [s["status"] for s in statuses] == ["QUEUED", "INITIALIZING", "COMPLETED"]
    assert await db.fetchval("SELECT url FROM job_files WHERE job_id = $1", job_id) == (
        "https://cdn.example/1.png")
    assert await db.fetchval("SELECT state FROM orphans WHERE backend_job_id = $1",
                             backend_id) == "matched"
    assert await db.fetchval("SELECT type FROM notifications WHERE job_id = $1",
                             job_id) == "IMAGE_COMPLETED"


async def test_an_own_id_already_taken_by_another_job_still_queues_the_job(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    other = await insert_job(db, status=Status.QUEUED)
    async with db.transaction() as conn:
        locked = await store_jobs.lock(conn, other)
        assert locked is not None
        await orphans.attach(conn, Kind.IMAGE, "backend-7", locked, source="operator")
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(own_id="backend-7"))
    await new_job(db, job_id=job_id)

    settled = await settle(db, job_id)

    assert settled["delivered_at"] is not None
    assert (await job(db, job_id))["status"] == "QUEUED"
    assert await db.fetchval("SELECT job_id FROM job_aliases WHERE backend_job_id = 'backend-7'"
                             ) == other


async def test_a_connection_dropped_after_the_job_was_taken_is_retried_and_ends_queued(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(lose_answer=True), ACCEPT)
    await new_job(db, job_id=job_id)

    await settle(db, job_id)

    calls = backend.calls_for(job_id)
    assert len(calls) == 2
    assert {c.headers["Idempotency-Key"] for c in calls} == {job_id}
    assert backend.accepted == {job_id: job_id}
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_a_connection_dropped_before_an_answer_is_retried(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(drop=True), Reply(drop=True), Reply(drop=True), ACCEPT)
    await new_job(db, job_id=job_id)

    await settle(db, job_id)

    assert len(backend.calls_for(job_id)) == 4  # one attempt of three tries, then another
    assert (await row(db, job_id))["attempts"] == 2
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_an_exhausted_schedule_fails_the_job(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    schedule = (0.05, 0.1, 0.2)
    await start_gateway(delivery_retry_schedule=schedule)
    job_id = await new_job(db)
    backend.default = status(503)

    settled = await settle(db, job_id)

    tries = len(schedule) + 1
    assert len(backend.calls_for(job_id)) == tries * INLINE_TRIES
    expected = (f"the generator backend was unreachable after {tries} attempts; "
                "last error: HTTP 503")
    assert settled["last_error"] == expected
    failed = await job(db, job_id)
    assert (failed["status"], failed["error_message"]) == ("FAILED", expected)
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE job_id = $1 "
                             "AND type = 'IMAGE_FAILED'", job_id) == 1


async def test_a_refused_connection_is_retried_until_the_schedule_ends(
    db: Database, start_gateway: StartGateway
) -> None:
    from tests.procs import free_port

    await start_gateway(backend_url=f"http://127.0.0.1:{free_port()}",
                        delivery_retry_schedule=(0.05,))
    job_id = await new_job(db)

    settled = await settle(db, job_id)

    assert settled["attempts"] == 2
    assert settled["last_error"].startswith(
        "the generator backend was unreachable after 2 attempts; last error: connection failed")
    assert (await job(db, job_id))["status"] == "FAILED"


async def test_a_crashed_claimers_row_is_claimed_again_after_its_lease(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    job_id = await new_job(db)
    async with db.connection() as conn:  # a process that claimed the row, then died
        [claimed] = await outbox.claim(conn, owner="crashed", lease_seconds=1.0, limit=10)
    assert claimed.job_id == job_id
    leased_until = (await row(db, job_id))["leased_until"]

    await start_gateway()
    settled = await settle(db, job_id)

    [call] = backend.calls_for(job_id)
    assert call.wall >= leased_until.timestamp() - 0.01  # nobody sent while the lease lived
    assert settled["attempts"] == 2
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_a_row_enqueued_while_no_dispatcher_runs_is_delivered_when_one_starts(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    job_id = await new_job(db)
    assert backend.calls == []

    await start_gateway()
    await settle(db, job_id)

    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_a_retry_pending_at_shutdown_is_delivered_after_a_restart(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    first = await start_gateway(delivery_retry_schedule=(3600.0,))
    job_id = str(uuid.uuid4())
    backend.script(job_id, status(503), status(503), status(503))
    await new_job(db, job_id=job_id)

    async def rescheduled() -> bool:
        return (await row(db, job_id))["last_error"] == "HTTP 503"

    await eventually(rescheduled)
    await first.close()
    await db.execute("UPDATE outbox SET due_at = now() WHERE job_id = $1", job_id)  # an hour on

    await start_gateway(delivery_retry_schedule=(3600.0,))
    settled = await settle(db, job_id)

    assert settled["delivered_at"] is not None
    assert len(backend.calls_for(job_id)) == 4
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_shutdown_lets_an_in_flight_send_finish(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    client = await start_gateway(backend_timeout_seconds=5.0)
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(hang=0.5))
    await new_job(db, job_id=job_id)

    async def in_flight() -> bool:
        return len(backend.calls) == 1

    await eventually(in_flight)
    await client.close()

    assert (await row(db, job_id))["delivered_at"] is not None
    assert (await job(db, job_id))["status"] == "QUEUED"


async def test_a_cancel_row_asks_the_backend_to_cancel_under_its_own_id(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(own_id="backend-42"))
    await new_job(db, job_id=job_id)
    await settle(db, job_id)

    await cancel_job(db, job_id)
    settled = await settle(db, job_id, "cancel")

    assert settled["delivered_at"] is not None
    [call] = backend.calls_for(job_id, "cancel")
    assert call.path_id == "backend-42"
    assert call.kind == "images"
    assert call.headers["Idempotency-Key"] == f"{job_id}:cancel"
    assert backend.cancelled == {job_id}
    assert (await job(db, job_id))["status"] == "CANCELLED"


async def test_a_cancel_without_an_alias_names_our_id(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = await new_job(db, kind=Kind.VIDEO)
    await settle(db, job_id)

    await cancel_job(db, job_id)
    await settle(db, job_id, "cancel")

    [call] = backend.calls_for(job_id, "cancel")
    assert (call.kind, call.path_id) == ("videos", job_id)


async def test_a_refused_cancel_only_marks_its_row_failed(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    job_id = await new_job(db)
    await settle(db, job_id)
    backend.script(job_id, status(404, body={"error": "unknown job"}), action="cancel")

    await cancel_job(db, job_id)
    settled = await settle(db, job_id, "cancel")

    assert settled["last_error"] == "the generator backend refused the cancel: 404 unknown job"
    assert (await job(db, job_id))["status"] == "CANCELLED"
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0


async def test_a_job_cancelled_before_delivery_is_never_sent(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    job_id = await new_job(db)
    await cancel_job(db, job_id)

    await start_gateway()
    generate = await settle(db, job_id)
    cancel = await settle(db, job_id, "cancel")

    assert backend.calls == []  # neither the job nor a cancel of what it never received
    assert generate["last_error"] == "not sent: the job was already CANCELLED before delivery"
    assert generate["payload"] is None
    assert cancel["last_error"] == "not sent: the generator backend never received the job"
    assert (await job(db, job_id))["status"] == "CANCELLED"


async def test_a_job_cancelled_while_its_delivery_waits_for_a_retry_is_cancelled_at_the_backend(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway(delivery_retry_schedule=(3600.0,))
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(lose_answer=True), status(503), status(503))
    await new_job(db, job_id=job_id)

    async def waiting() -> bool:
        return (await row(db, job_id))["last_error"] == "HTTP 503"

    await eventually(waiting)
    await cancel_job(db, job_id)  # the backend may well have the job: the first try reached it
    await settle(db, job_id, "cancel")

    assert len(backend.calls_for(job_id)) == 3  # not sent again once cancelled
    assert (await row(db, job_id))["last_error"].startswith("not sent")
    assert len(backend.calls_for(job_id, "cancel")) == 1
    assert backend.cancelled == {job_id}


async def test_the_api_key_is_sent_as_a_bearer_token_and_never_logged(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    key = "sk-backend-test-key-0123456789"
    with structlog.testing.capture_logs() as logs:
        client = await start_gateway(backend_api_key=Secret(key))
        job_id = str(uuid.uuid4())
        backend.script(job_id, status(500), ACCEPT)
        await new_job(db, job_id=job_id)
        await settle(db, job_id)
        await client.close()

    assert {c.headers["Authorization"] for c in backend.calls} == {f"Bearer {key}"}
    events = [e["event"] for e in logs if e.get("job_id") == job_id]
    assert events.count("delivery_attempt") == 2
    assert "delivery_retry" in events
    assert "delivery_delivered" in events
    assert all(key not in repr(entry) for entry in logs)


async def test_without_a_backend_url_no_dispatcher_runs(
    db: Database, aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings
) -> None:
    assert settings.backend_url is None
    client = await aiohttp_client(create_app(settings))
    job_id = await new_job(db)
    await asyncio.sleep(0.1)
    with pytest.raises(RuntimeError, match="BACKEND_URL"):
        get_dispatcher(client.app)
    assert (await row(db, job_id))["attempts"] == 0


async def test_the_listener_reconnects_after_losing_its_connection(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway
) -> None:
    await start_gateway()
    listening = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                 "AND query LIKE 'LISTEN%sorami_outbox%'")

    async def listener_up() -> bool:
        return bool(await db.fetch(listening))

    await eventually(listener_up)
    [old] = await db.fetch(listening)
    await db.execute("SELECT pg_terminate_backend($1)", old["pid"])

    async def replaced() -> bool:
        return any(r["pid"] != old["pid"] for r in await db.fetch(listening))

    await eventually(replaced)
    job_id = await new_job(db)
    await settle(db, job_id)
    assert (await job(db, job_id))["status"] == "QUEUED"


@pytest.mark.parametrize(
    ("meanwhile", "final"),
    [
        # already generating when the answer comes (the claim read it pending): the answer
        # settles the row and the job stays where the webhook put it
        (Event(Status.GENERATING, 40), ("GENERATING", 40, 2)),
        # timed out meanwhile: settled, and the job stays timed out
        (Event(Status.TIMED_OUT), ("TIMED_OUT", 0, 2)),
    ],
)
async def test_an_answer_recorded_after_the_job_moved_is_decided_under_its_lock(
    db: Database, backend: ScriptedBackend, start_gateway: StartGateway,
    meanwhile: Event, final: tuple[str, int, int],
) -> None:
    await start_gateway()
    job_id = str(uuid.uuid4())
    backend.script(job_id, Reply(hang=0.3))
    await new_job(db, job_id=job_id)
    await eventually(lambda: _called(backend, job_id))
    # the claim read the job at seq 1; it moves before the answer is recorded
    async with db.transaction() as conn:
        locked = await store_jobs.lock(conn, job_id)
        assert locked is not None
        await store_jobs.apply(conn, locked, store_jobs.JobUpdate(
            event=meanwhile, source="webhook", message="moved", from_webhook=True))

    settled = await settle(db, job_id)

    assert settled["delivered_at"] is not None
    now = await job(db, job_id)
    assert (now["status"], now["progress"], now["seq"]) == final
    events = await db.fetch("SELECT seq, status FROM job_events WHERE job_id = $1 ORDER BY seq",
                            job_id)
    assert [e["seq"] for e in events] == list(range(2, final[2] + 1))


async def _called(backend: ScriptedBackend, job_id: str) -> bool:
    return bool(backend.calls_for(job_id))
