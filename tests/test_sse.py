"""`GET /api/jobs/{id}/events`: live status over Server-Sent Events, through LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import structlog

from gateway import keys
from gateway.app import create_app
from gateway.events import JobEventHub
from gateway.jobs.kinds import Kind
from gateway.jobs.records import JobUpdate
from gateway.jobs.state import Event, Status
from gateway.settings import Settings, SettingsError
from gateway.store import Database
from gateway.store.events import LISTENER_APPLICATION_NAME
from tests.conftest import HS256_SECRET, WEBHOOK_SECRET
from tests.factories import apply_update, insert_job
from tests.procs import clean_env, free_port, start, wait_ready
from tests.tokens import user


@dataclasses.dataclass
class Block:
    id: str | None = None
    data: dict[str, Any] | None = None
    comment: str | None = None
    retry: int | None = None


async def read_block(resp: aiohttp.ClientResponse, seconds: float = 10.0) -> Block | None:
    """The next event block of the stream; None once the server ended it."""
    block, seen = Block(), False
    async with asyncio.timeout(seconds):
        while True:
            raw = await resp.content.readline()
            if raw == b"":
                return block if seen else None
            line = raw.decode().rstrip("\n")
            if line == "":
                if seen:
                    return block
                continue
            seen = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                block.comment = value
            elif name == "id":
                block.id = value
            elif name == "data":
                block.data = json.loads(value)
            elif name == "retry":
                block.retry = int(value)


async def next_event(resp: aiohttp.ClientResponse, seconds: float = 10.0) -> Block | None:
    """The next block carrying data, skipping retry hints and heartbeats."""
    while True:
        block = await read_block(resp, seconds)
        if block is None or block.data is not None:
            return block


async def open_stream(client: Any, job_id: str, sub: str = "user_a",
                      last_event_id: str | None = None) -> aiohttp.ClientResponse:
    headers = user(sub)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    resp: aiohttp.ClientResponse = await client.get(f"/api/jobs/{job_id}/events",
                                                    headers=headers)
    return resp


def update(status: Status, progress: int | None = None, message: str | None = None) -> JobUpdate:
    return JobUpdate(Event(status, progress), source="webhook", message=message)


async def test_stream_starts_with_the_current_state(client: Any, db: Database) -> None:
    job_id = await insert_job(db, kind=Kind.VIDEO, status=Status.GENERATING, progress=40)
    resp = await open_stream(client, job_id)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    hint = await read_block(resp)
    assert hint is not None
    assert hint.retry == 3000
    first = await next_event(resp)
    assert first is not None
    assert first.id == "1"
    assert first.data is not None
    assert {k: first.data[k] for k in ("job_id", "kind", "seq", "status", "progress")} == {
        "job_id": job_id, "kind": "video", "seq": 1, "status": "GENERATING", "progress": 40}
    resp.close()


async def test_a_change_committed_through_another_connection_arrives(
    client: Any, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.QUEUED)
    resp = await open_stream(client, job_id)
    assert (await next_event(resp)) is not None
    await apply_update(db, job_id, update(Status.GENERATING, 55, "halfway"))
    change = await next_event(resp)
    assert change is not None
    assert change.id == "2"
    assert change.data is not None
    assert (change.data["status"], change.data["progress"], change.data["message"]) == (
        "GENERATING", 55, "halfway")
    resp.close()


async def test_stream_closes_after_a_terminal_status(client: Any, db: Database) -> None:
    job_id = await insert_job(db, status=Status.GENERATING)
    resp = await open_stream(client, job_id)
    assert (await next_event(resp)) is not None
    await apply_update(db, job_id, JobUpdate(Event(Status.FAILED), source="webhook",
                                             error_message="Quota exceeded"))
    final = await next_event(resp)
    assert final is not None
    assert final.data is not None
    assert (final.data["status"], final.data["error_message"]) == ("FAILED", "Quota exceeded")
    assert await read_block(resp) is None


async def test_finished_job_sends_its_state_and_closes(client: Any, db: Database) -> None:
    job_id = await insert_job(db, status=Status.CANCELLED)
    resp = await open_stream(client, job_id)
    first = await next_event(resp)
    assert first is not None
    assert first.data is not None
    assert first.data["status"] == "CANCELLED"
    assert await read_block(resp) is None


async def test_last_event_id_replays_every_change_after_it(client: Any, db: Database) -> None:
    job_id = await insert_job(db, status=Status.QUEUED)
    for status, progress in [(Status.INITIALIZING, 5), (Status.GENERATING, 30),
                             (Status.GENERATING, 60)]:
        await apply_update(db, job_id, update(status, progress))
    resp = await open_stream(client, job_id, last_event_id="2")
    replayed = [await next_event(resp), await next_event(resp)]
    assert [(b.id, b.data["status"], b.data["progress"]) for b in replayed
            if b is not None and b.data is not None] == [
        ("3", "GENERATING", 30), ("4", "GENERATING", 60)]
    await apply_update(db, job_id, update(Status.COMPLETED))
    final = await next_event(resp)
    assert final is not None
    assert (final.id, final.data) == ("5", final.data)
    assert final.data is not None
    assert final.data["status"] == "COMPLETED"
    assert await read_block(resp) is None


async def test_unknown_last_event_id_starts_from_the_current_state(
    client: Any, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.QUEUED)
    await apply_update(db, job_id, update(Status.GENERATING, 10))
    for bad in ("99", "abc", "0"):
        resp = await open_stream(client, job_id, last_event_id=bad)
        first = await next_event(resp)
        assert first is not None
        assert first.id == "2"
        resp.close()


async def test_reconnect_after_the_final_event_is_204(client: Any, db: Database) -> None:
    job_id = await insert_job(db, status=Status.GENERATING)
    await apply_update(db, job_id, update(Status.COMPLETED))
    resp = await open_stream(client, job_id, last_event_id="2")
    assert resp.status == 204


async def test_heartbeat_comment_while_nothing_changes(
    make_settings: Callable[..., Settings], db: Database, aiohttp_client: Callable[..., Any]
) -> None:
    client = await aiohttp_client(create_app(make_settings(sse_heartbeat_seconds=0.2)))
    job_id = await insert_job(db, status=Status.GENERATING)
    resp = await open_stream(client, job_id)
    assert (await next_event(resp)) is not None
    beat = await read_block(resp, seconds=5)
    assert beat is not None
    assert (beat.comment, beat.data) == ("keep-alive", None)
    await apply_update(db, job_id, update(Status.SAVING, 90))
    change = await next_event(resp)
    assert change is not None
    assert change.id == "2"
    resp.close()


async def listener_backends(db: Database) -> int:
    found: int = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = $1 AND datname = current_database()",
        LISTENER_APPLICATION_NAME,
    )
    return found


async def test_one_listening_connection_serves_every_subscriber(
    client: Any, db: Database
) -> None:
    jobs = [await insert_job(db, status=Status.QUEUED) for _ in range(3)]
    streams = [await open_stream(client, job_id) for job_id in [*jobs, jobs[0]]]
    for resp in streams:
        assert (await next_event(resp)) is not None
    assert await listener_backends(db) == 1
    for job_id in jobs:
        await apply_update(db, job_id, update(Status.GENERATING, 20))
    for resp, job_id in zip(streams, [*jobs, jobs[0]], strict=True):
        change = await next_event(resp)
        assert change is not None
        assert change.data is not None
        assert (change.data["job_id"], change.data["status"]) == (job_id, "GENERATING")
        resp.close()
    assert await listener_backends(db) == 1


async def test_changes_while_the_listener_is_down_reach_subscribers(
    client: Any, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.QUEUED)
    resp = await open_stream(client, job_id)
    assert (await next_event(resp)) is not None
    hub: JobEventHub = client.app[keys.JOB_EVENTS]
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = $1 AND datname = current_database()",
        LISTENER_APPLICATION_NAME,
    )
    async with asyncio.timeout(10):
        while hub.listening:  # noqa: ASYNC110 - the hub's own state, polled with a deadline
            await asyncio.sleep(0.01)
    # nobody listens now: this NOTIFY is lost, the re-read after reconnecting finds it
    await apply_update(db, job_id, update(Status.GENERATING, 70))
    change = await next_event(resp)
    assert change is not None
    assert change.data is not None
    assert (change.id, change.data["status"]) == ("2", "GENERATING")
    assert hub.listening
    resp.close()


async def test_hub_wakes_only_the_subscribers_of_the_changed_job(
    database_url: str, db: Database
) -> None:
    changed, other = await insert_job(db), await insert_job(db)
    hub = JobEventHub(database_url)
    hub.start()
    try:
        await hub.wait_listening()
        with hub.subscribe(changed) as first, hub.subscribe(changed) as second, \
                hub.subscribe(other) as bystander:
            await apply_update(db, changed, update(Status.GENERATING, 10))
            assert await first.wait(5)
            assert await second.wait(5)
            assert not bystander._woken.is_set()
            assert hub.subscriber_count == 3
        assert hub.subscriber_count == 0
    finally:
        await hub.close()


async def test_shutdown_ends_open_streams(client: Any, db: Database) -> None:
    job_id = await insert_job(db, status=Status.GENERATING)
    resp = await open_stream(client, job_id)
    assert (await next_event(resp)) is not None
    # without ending the streams, shutdown would wait for them (60 s for the test server)
    await asyncio.wait_for(client.server.close(), 10)
    try:
        ended = await read_block(resp)
    except aiohttp.ClientPayloadError:
        ended = None
    assert ended is None


async def test_a_subscriber_on_one_server_process_sees_a_change_made_through_another(
    database_url: str, db: Database
) -> None:
    ports = free_port(), free_port()
    procs = [
        start(["serve", "--no-migrate"], clean_env(
            DATABASE_URL=database_url, WEBHOOK_SECRETS=WEBHOOK_SECRET,
            AUTH_HS256_SECRET=HS256_SECRET, PORT=str(port)))
        for port in ports
    ]
    try:
        await asyncio.gather(*(wait_ready(port, timeout=20) for port in ports))
        one, other = (f"http://127.0.0.1:{port}" for port in ports)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{one}/api/images/generate", json={"prompt": "a comet"},
                                 headers=user()) as created:
                assert created.status == 202
                job_id = (await created.json())["job_id"]
            async with http.get(f"{other}/api/jobs/{job_id}/events", headers=user()) as stream:
                first = await next_event(stream)
                assert first is not None
                assert first.data is not None
                assert first.data["status"] == "PENDING"
                async with http.post(f"{one}/api/images/{job_id}/cancel",
                                     headers=user()) as cancelled:
                    assert cancelled.status == 200
                change = await next_event(stream)
                assert change is not None
                assert change.data is not None
                assert (change.id, change.data["status"]) == ("2", "CANCELLED")
                assert await read_block(stream) is None
    finally:
        for proc in procs:
            code, err = proc.stop()
            assert code == 0, err


def test_sse_heartbeat_setting() -> None:
    assert Settings.from_env({"SSE_HEARTBEAT_SECONDS": "2.5"}).sse_heartbeat_seconds == 2.5
    assert Settings.from_env({}).sse_heartbeat_seconds == 15.0
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"SSE_HEARTBEAT_SECONDS": "0"})
    assert caught.value.variable == "SSE_HEARTBEAT_SECONDS"


async def test_shutdown_after_a_client_left_is_quiet(client: Any, db: Database) -> None:
    job_id = await insert_job(db, status=Status.GENERATING)
    resp = await open_stream(client, job_id)
    assert (await next_event(resp)) is not None
    resp.close()  # the client goes away without the server writing anything since
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(client.server.close(), 10)
    assert [e for e in logs if e["log_level"] == "error"] == []
