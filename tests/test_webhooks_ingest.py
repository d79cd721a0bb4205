"""What a verified delivery does: applied, duplicate, stale or orphaned, exactly once."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode
from gateway.jobs.prompts import fingerprint, normalize
from gateway.jobs.records import JobUpdate
from gateway.jobs.state import Event, JobState, Status, transition
from gateway.store import Database, orphans
from gateway.store import jobs as store_jobs
from gateway.store import webhooks as store_webhooks
from gateway.usecases.ingest import ingest
from tests.conftest import WEBHOOK_KEY, WEBHOOK_SECRET
from tests.factories import insert_job
from tests.signing import signed

Client = TestClient[web.Request, web.Application]
ROUTES = {Kind.IMAGE: "/api/webhooks/image-completion",
          Kind.VIDEO: "/api/webhooks/video-completion"}
PROMPT = "Un chat mignon avec des lunettes de soleil"


def image(index: int = 1) -> dict[str, Any]:
    return {"file_path": f"images/x/image_{index}.png", "url": f"https://cdn/x/image_{index}.png",
            "description": PROMPT, "format": "png", "size_bytes": 524288 + index,
            "dimensions": "1024x768"}


def completed(job_id: str, files: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id, "status": "completed", "timestamp": "2025-10-23T14:30:00.000Z",
        "message": "done",
        "data": {"images": [image(i) for i in range(1, files + 1)],
                 "metadata": {"model_name": "gemini-2.5-flash-image", "version": "1.0",
                              "generation_time_seconds": 12.5}},
        **extra,
    }


def progress(job_id: str, status: str, value: int) -> dict[str, Any]:
    return {"job_id": job_id, "status": status, "progress": value, "message": status}


async def deliver(client: Client, payload: Any, msg_id: str, kind: Kind = Kind.IMAGE) -> Any:
    body, headers = signed(payload, WEBHOOK_KEY, msg_id)
    resp = await client.post(ROUTES[kind], data=body, headers=headers)
    return resp.status, await resp.json()


async def job_row(db: Database, job_id: str) -> Any:
    return await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_progress_webhook_is_applied_and_recorded(client: Client, db: Database) -> None:
    job_id = await insert_job(db)
    assert await deliver(client, progress(job_id, "generating", 60), "msg_1") == (
        200, {"outcome": "applied"})
    job = await job_row(db, job_id)
    assert (job["status"], job["progress"], job["message"], job["seq"]) == (
        "GENERATING", 60, "generating", 2)
    assert job["first_webhook_at"] is not None
    delivery = await db.fetchrow("SELECT * FROM webhook_deliveries")
    assert delivery is not None
    assert dict(delivery) | {"received_at": None} == {
        "dedupe_key": "id:msg_1", "kind": "image", "backend_job_id": job_id, "job_id": job_id,
        "event_status": "generating", "outcome": "applied", "received_at": None}
    events = await db.fetch("SELECT seq, status, source FROM job_events WHERE job_id = $1",
                            job_id)
    assert [tuple(e) for e in events] == [(2, "GENERATING", "webhook")]


async def test_duplicate_delivery_answers_duplicate_and_changes_nothing(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    await deliver(client, progress(job_id, "generating", 60), "msg_1")
    before = await job_row(db, job_id)
    # the same delivery again, even with content that would otherwise move the job
    assert await deliver(client, progress(job_id, "saving", 90), "msg_1") == (
        200, {"outcome": "duplicate"})
    assert await job_row(db, job_id) == before
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
    assert await db.fetchval("SELECT count(*) FROM job_events") == 1


async def test_stale_webhook_is_recorded_and_changes_nothing(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.SAVING, progress=90)
    before = await job_row(db, job_id)
    assert await deliver(client, progress(job_id, "generating", 60), "msg_1") == (
        200, {"outcome": "stale"})
    assert await job_row(db, job_id) == before
    delivery = await db.fetchrow("SELECT outcome, job_id FROM webhook_deliveries")
    assert delivery is not None
    assert (delivery["outcome"], delivery["job_id"]) == ("stale", job_id)
    assert await db.fetchval("SELECT count(*) FROM job_events") == 0
    # a stale delivery repeated is a duplicate, not a second record
    assert await deliver(client, progress(job_id, "generating", 60), "msg_1") == (
        200, {"outcome": "duplicate"})


async def test_unknown_job_id_is_kept_as_an_orphan_and_answered_202(
    client: Client, db: Database
) -> None:
    await insert_job(db, user_id="user_first")  # the old bug's victim: must stay untouched
    payload = completed("backend-77", user_id="user_2abc", original_prompt="  A CAT  ",
                        environment="production", new_backend_field={"kept": [1, 2]})
    assert await deliver(client, payload, "msg_1") == (202, {"outcome": "orphaned"})
    orphan = await db.fetchrow("SELECT * FROM orphans")
    assert orphan is not None
    assert (orphan["kind"], orphan["backend_job_id"], orphan["state"], orphan["user_id"],
            orphan["prompt"], orphan["prompt_norm"], orphan["file_count"],
            orphan["event_count"]) == (
        "image", "backend-77", "unresolved", "user_2abc", "  A CAT  ", "a cat", 2, 1)
    event = await db.fetchrow("SELECT * FROM orphan_events")
    assert event is not None
    assert (event["dedupe_key"], event["event_status"], event["applied_at"]) == (
        "id:msg_1", "completed", None)
    assert event["payload"] == payload  # whole, unknown fields included
    delivery = await db.fetchrow("SELECT outcome, job_id FROM webhook_deliveries")
    assert delivery is not None
    assert (delivery["outcome"], delivery["job_id"]) == ("orphaned", None)
    # nobody got a job, a file or a notification
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1
    assert await db.fetchval("SELECT count(*) FROM job_files") == 0
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    assert await db.fetchval("SELECT count(*) FROM job_events") == 0


async def test_a_later_webhook_for_the_same_orphan_adds_an_event(
    client: Client, db: Database
) -> None:
    await deliver(client, progress("backend-77", "generating", 60), "msg_1")
    assert await deliver(client, completed("backend-77", original_prompt="a cat"), "msg_2") == (
        202, {"outcome": "orphaned"})
    orphan = await db.fetchrow("SELECT event_count, prompt_norm, file_count FROM orphans")
    assert orphan is not None
    assert tuple(orphan) == (2, "a cat", 2)
    keys = await db.fetch("SELECT dedupe_key FROM orphan_events ORDER BY id")
    assert [k["dedupe_key"] for k in keys] == ["id:msg_1", "id:msg_2"]


async def test_a_repeated_orphan_delivery_is_a_duplicate(client: Client, db: Database) -> None:
    await deliver(client, progress("backend-77", "generating", 60), "msg_1")
    assert await deliver(client, progress("backend-77", "generating", 60), "msg_1") == (
        200, {"outcome": "duplicate"})
    assert await db.fetchval("SELECT event_count FROM orphans") == 1
    assert await db.fetchval("SELECT count(*) FROM orphan_events") == 1


async def test_prompt_hint_falls_back_to_the_file_description(
    client: Client, db: Database
) -> None:
    await deliver(client, completed("backend-77"), "msg_1")
    assert await db.fetchval("SELECT prompt_norm FROM orphans") == normalize(PROMPT)


async def test_a_webhook_under_a_known_alias_reaches_its_job(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    async with db.transaction() as conn:
        job = await store_jobs.lock(conn, job_id)
        assert job is not None
        await orphans.attach(conn, Kind.IMAGE, "backend-77", job, source="delivery")
    assert await deliver(client, progress("backend-77", "generating", 60), "msg_1") == (
        200, {"outcome": "applied"})
    job_status = await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
    assert job_status == "GENERATING"
    delivery = await db.fetchrow("SELECT backend_job_id, job_id FROM webhook_deliveries")
    assert delivery is not None
    assert tuple(delivery) == ("backend-77", job_id)
    assert await db.fetchval("SELECT count(*) FROM orphans") == 0


async def test_an_image_job_id_on_the_video_route_is_not_applied_to_it(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, kind=Kind.IMAGE)
    assert await deliver(client, progress(job_id, "generating", 60), "msg_1", Kind.VIDEO) == (
        202, {"outcome": "orphaned"})
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "QUEUED"


async def test_completed_creates_files_and_one_notification_even_after_ten_deliveries(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, user_id="user_a")
    answers = [await deliver(client, completed(job_id), "msg_done") for _ in range(10)]
    assert answers == [(200, {"outcome": "applied"})] + [(200, {"outcome": "duplicate"})] * 9
    job = await job_row(db, job_id)
    assert (job["status"], job["progress"], job["model_name"], job["generation_time_seconds"]) \
        == ("COMPLETED", 100, "gemini-2.5-flash-image", 12.5)
    assert job["finished_at"] is not None
    files = await db.fetch(
        "SELECT position, url, storage_key, filename, format, size_bytes, width, height, "
        "duration_seconds FROM job_files WHERE job_id = $1 ORDER BY position", job_id)
    assert [tuple(f) for f in files] == [
        (0, "https://cdn/x/image_1.png", "images/x/image_1.png", "image_1.png", "PNG", 524289,
         1024, 768, None),
        (1, "https://cdn/x/image_2.png", "images/x/image_2.png", "image_2.png", "PNG", 524290,
         1024, 768, None),
    ]
    notes = await db.fetch("SELECT user_id, type FROM notifications")
    assert [tuple(n) for n in notes] == [("user_a", "IMAGE_COMPLETED")]


async def test_ten_distinct_deliveries_of_one_completion_make_one_set_of_files(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    answers = [await deliver(client, completed(job_id), f"msg_{i}") for i in range(10)]
    assert answers == [(200, {"outcome": "applied"})] + [(200, {"outcome": "stale"})] * 9
    assert await db.fetchval("SELECT count(*) FROM job_files") == 2
    assert await db.fetchval("SELECT count(*) FROM notifications") == 1
    assert await db.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE outcome = 'stale'") == 9


async def test_failed_keeps_the_error_message_and_notifies_once(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.GENERATING, progress=60)
    failed = {"job_id": job_id, "status": "failed", "message": "La génération a échoué",
              "error_message": "Erreur lors de la génération: Quota API dépassé"}
    assert await deliver(client, failed, "msg_1") == (200, {"outcome": "applied"})
    assert await deliver(client, failed, "msg_2") == (200, {"outcome": "stale"})
    job = await job_row(db, job_id)
    assert (job["status"], job["progress"], job["error_message"]) == (
        "FAILED", 60, "Erreur lors de la génération: Quota API dépassé")
    notes = await db.fetch("SELECT type, message FROM notifications")
    assert [tuple(n) for n in notes] == [
        ("IMAGE_FAILED", "Erreur lors de la génération: Quota API dépassé")]
    assert await db.fetchval("SELECT count(*) FROM job_files") == 0


async def test_video_completion_keeps_the_duration(client: Client, db: Database) -> None:
    job_id = await insert_job(db, kind=Kind.VIDEO)
    payload = {"job_id": job_id, "status": "completed", "data": {"videos": [
        {"file_path": "videos/x/v.mp4", "url": "https://cdn/v.mp4", "format": "MP4",
         "size_bytes": 1, "duration_seconds": 8.0, "dimensions": "1280x720"}]}}
    assert await deliver(client, payload, "msg_1", Kind.VIDEO) == (200, {"outcome": "applied"})
    f = await db.fetchrow("SELECT width, height, duration_seconds FROM job_files")
    assert f is not None
    assert tuple(f) == (1280, 720, 8.0)
    assert await db.fetchval("SELECT type FROM notifications") == "VIDEO_COMPLETED"


async def test_completion_of_a_timed_out_job_still_completes_it(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.TIMED_OUT, progress=60)
    assert await deliver(client, completed(job_id), "msg_1") == (200, {"outcome": "applied"})
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "COMPLETED"
    assert await db.fetchval("SELECT count(*) FROM job_files") == 2


async def test_a_cancelled_job_stays_cancelled(client: Client, db: Database) -> None:
    job_id = await insert_job(db, status=Status.CANCELLED)
    assert await deliver(client, completed(job_id), "msg_1") == (200, {"outcome": "stale"})
    assert await db.fetchval("SELECT count(*) FROM job_files") == 0
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0


STEPS = [("initializing", 25), ("generating", 60), ("saving", 90), ("completed", 100)]


async def test_every_arrival_order_of_one_jobs_webhooks_converges(
    client: Client, db: Database
) -> None:
    finals = set()
    for order, permutation in enumerate(itertools.permutations(STEPS)):
        job_id = await insert_job(db, job_id=f"job-{order}")
        for step, (status, value) in enumerate(permutation):
            payload = (completed(job_id, files=1) if status == "completed"
                       else progress(job_id, status, value))
            status_code, _ = await deliver(client, payload, f"msg-{order}-{step}")
            assert status_code == 200
        job = await job_row(db, job_id)
        files = await db.fetchval("SELECT count(*) FROM job_files WHERE job_id = $1", job_id)
        notes = await db.fetchval("SELECT count(*) FROM notifications WHERE job_id = $1",
                                  job_id)
        finals.add((job["status"], job["progress"], files, notes))
    assert finals == {("COMPLETED", 100, 1, 1)}


async def test_progress_never_goes_back_whatever_the_order(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    seen = []
    for i, (status, value) in enumerate([("generating", 60), ("initializing", 25),
                                         ("generating", 40), ("generating", 70)]):
        await deliver(client, progress(job_id, status, value), f"msg_{i}")
        job = await job_row(db, job_id)
        seen.append((job["status"], job["progress"]))
    assert seen == [("GENERATING", 60), ("GENERATING", 60), ("GENERATING", 60),
                    ("GENERATING", 70)]


async def test_outcomes_and_effects_are_counted(client: Client, db: Database) -> None:
    job_id = await insert_job(db, created_ago_seconds=30)
    names = {
        "applied": ("sorami_webhooks_total", {"kind": "image", "outcome": "applied"}),
        "duplicate": ("sorami_webhooks_total", {"kind": "image", "outcome": "duplicate"}),
        "stale": ("sorami_webhooks_total", {"kind": "image", "outcome": "stale"}),
        "orphaned": ("sorami_webhooks_total", {"kind": "image", "outcome": "orphaned"}),
        "notified": ("sorami_notifications_created_total", {"type": "IMAGE_COMPLETED"}),
        "durations": ("sorami_job_duration_seconds_count",
                      {"kind": "image", "status": "COMPLETED"}),
        "first": ("sorami_job_first_webhook_seconds_count", {"kind": "image"}),
        "first_sum": ("sorami_job_first_webhook_seconds_sum", {"kind": "image"}),
        "processing": ("sorami_webhook_processing_seconds_count", {"kind": "image"}),
    }
    before = {k: sample(*v) for k, v in names.items()}
    await deliver(client, progress(job_id, "generating", 60), "msg_1")
    await deliver(client, completed(job_id), "msg_2")
    await deliver(client, completed(job_id), "msg_2")
    await deliver(client, progress(job_id, "saving", 90), "msg_3")
    await deliver(client, progress("backend-9", "saving", 90), "msg_4")
    delta = {k: sample(*v) - before[k] for k, v in names.items()}
    assert delta.pop("first_sum") >= 30
    assert delta == {"applied": 2, "duplicate": 1, "stale": 1, "orphaned": 1, "notified": 1,
                     "durations": 1, "first": 1, "processing": 5}


async def test_logs_name_the_event_and_never_carry_the_prompt_or_secrets(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    secret_prompt = "a very private prompt about my cat"
    with structlog.testing.capture_logs() as logs:
        await deliver(client, progress(job_id, "generating", 60), "msg_1")
        await deliver(client, progress(job_id, "generating", 60), "msg_1")
        await deliver(client, completed("backend-1", original_prompt=secret_prompt), "msg_2")
    events = {entry["event"]: entry for entry in logs}
    assert {"webhook_applied", "webhook_duplicate", "webhook_orphaned"} <= set(events)
    assert (events["webhook_applied"]["job_id"], events["webhook_applied"]["webhook_id"]) == (
        job_id, "msg_1")
    orphaned = events["webhook_orphaned"]
    assert (orphaned["prompt_length"], orphaned["prompt_fingerprint"]) == (
        len(secret_prompt), fingerprint(secret_prompt))
    text = repr(logs)
    assert secret_prompt not in text
    assert WEBHOOK_SECRET not in text
    assert "v1," not in text  # no signature either


@pytest.mark.parametrize("kind", list(Kind))
async def test_both_routes_answer(client: Client, db: Database, kind: Kind) -> None:
    job_id = await insert_job(db, kind=kind)
    assert await deliver(client, progress(job_id, "initializing", 25), "msg_1", kind) == (
        200, {"outcome": "applied"})


# --- a job that changes, or a key that is taken, while the statement waits for the job's lock ---


async def _waiting_on_a_lock(db: Database, deadline: float = 10.0) -> None:
    """Until some other session of this database waits for a row lock."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while loop.time() < until:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'")
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("no session waited for a lock")


@pytest.mark.parametrize(
    ("meanwhile", "expected"),
    [
        # the job moved on, yet the delivery still moves it: applied after the other change
        (Event(Status.GENERATING, 30), ("applied", "GENERATING", 50, 3)),
        # the job finished meanwhile: the delivery is now stale, and recorded as such
        (Event(Status.FAILED), ("stale", "FAILED", 0, 2)),
    ],
)
async def test_a_job_changed_after_it_was_read_is_decided_again_under_its_lock(
    client: Client, db: Database, meanwhile: Event, expected: tuple[str, str, int, int]
) -> None:
    job_id = await insert_job(db)
    async with db.transaction() as conn:
        # hold the job's row: the delivery reads the job (seq 1), then waits for the lock
        locked = await store_jobs.lock(conn, job_id)
        assert locked is not None
        assert locked.seq == 1
        sending = asyncio.create_task(deliver(client, progress(job_id, "generating", 50), "m"))
        await _waiting_on_a_lock(db)
        await store_jobs.apply(conn, locked, JobUpdate(meanwhile, source="test"))
    status, answer = await asyncio.wait_for(sending, 10)
    outcome, job_status, job_progress, seq = expected
    assert (status, answer) == (200, {"outcome": outcome})
    job = await job_row(db, job_id)
    assert (job["status"], job["progress"], job["seq"]) == (job_status, job_progress, seq)
    assert await db.fetchval("SELECT outcome FROM webhook_deliveries") == outcome
    assert await db.fetchval("SELECT count(*) FROM job_events WHERE job_id = $1", job_id) == seq - 1


async def test_a_repeat_committed_while_the_statement_waited_for_the_lock_is_a_duplicate(
    client: Client, db: Database
) -> None:
    """The key is free when the statement looks, and taken (committed by another delivery)
    when it has the job's lock: the claim fails and nothing is written."""
    job_id = await insert_job(db)
    before = await job_row(db, job_id)
    async with db.transaction() as conn:
        await store_jobs.lock(conn, job_id)
        sending = asyncio.create_task(deliver(client, progress(job_id, "generating", 50), "m"))
        await _waiting_on_a_lock(db)
        await conn.execute("INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id,"
                           " job_id, event_status, outcome) VALUES ('id:m', 'image', $1, $1,"
                           " 'generating', 'applied')", job_id)
    assert await asyncio.wait_for(sending, 10) == (200, {"outcome": "duplicate"})
    assert dict(await job_row(db, job_id)) == dict(before)
    assert await db.fetchval("SELECT count(*) FROM job_events") == 0
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1


# --- the statement decides as the state machine does, in every state --------------------------

CURRENT_PROGRESS = (0, 40, 100)
EVENT_PROGRESS = (None, 0, 39, 40, 41, 100)


def _payload(status: Status, value: int | None) -> dict[str, Any]:
    if status is Status.COMPLETED:
        return completed("x")
    body: dict[str, Any] = {"job_id": "x", "status": status.value.lower(), "message": "m"}
    if status is Status.FAILED:
        body["error_message"] = "boom"
    if value is not None:
        body["progress"] = value
    return body


async def test_the_statement_decides_every_state_as_the_state_machine_does(db: Database) -> None:
    cases = [
        (current, now, event, value)
        for current, now, event in itertools.product(Status, CURRENT_PROGRESS, Status)
        for value in (EVENT_PROGRESS if not event.terminal else (None,))
    ]
    ids = [f"job-{n}" for n in range(len(cases))]
    await db.execute(
        "INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, status, progress)"
        " SELECT id, 'image', 'user_a', 'p', 'p', status::job_status, progress"
        " FROM unnest($1::text[], $2::text[], $3::smallint[]) AS c(id, status, progress)",
        ids, [c[0].value for c in cases], [c[1] for c in cases],
    )
    seen: dict[str, int] = {}
    for job_id, (current, now, event, value) in zip(ids, cases, strict=True):
        body = msgspec.json.encode({**_payload(event, value), "job_id": job_id})
        delivery = store_webhooks.Delivery(Kind.IMAGE, f"id:{job_id}", decode(body), body)
        async with db.connection() as conn:
            result = await ingest(conn, delivery)
        expected = transition(JobState(current, now), Event(event, value))
        row = await job_row(db, job_id)
        case = (current, now, event, value)
        assert (Status(row["status"]), row["progress"]) == (
            expected.state.status, expected.state.progress), case
        assert result.outcome.value == expected.outcome.value, case
        assert row["seq"] == (2 if expected.applied else 1), case
        assert await db.fetchval(
            "SELECT outcome FROM webhook_deliveries WHERE dedupe_key = $1", delivery.dedupe_key
        ) == expected.outcome.value, case
        seen[expected.outcome.value] = seen.get(expected.outcome.value, 0) + 1
    assert seen["applied"] > 0
    assert seen["stale"] > 0
    # a terminal event made its files and notification, and nothing else did
    assert await db.fetchval("SELECT count(*) FROM job_events") == seen["applied"]
    assert await db.fetchval(
        "SELECT count(DISTINCT job_id) FROM job_files"
    ) == await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'COMPLETED' AND seq = 2")
    # the owner is told of a completion or a failure it did not know of; a cancel is silent
    assert await db.fetchval(
        "SELECT count(*) FROM notifications n JOIN jobs j ON j.id = n.job_id"
        " WHERE n.user_id = j.user_id AND n.metadata->>'job_id' = j.id"
    ) == await db.fetchval(
        "SELECT count(*) FROM jobs WHERE seq = 2 AND status IN ('COMPLETED', 'FAILED', 'TIMED_OUT')"
    ) > 0
