"""The reconciler's rules, one behaviour per test, against a real PostgreSQL.

Orphans are recorded the way the receiver records them (its lock, then `orphans.record`
with the hints read from a real payload shaped like the Flask backend's), jobs with
`tests.factories.insert_job`. The helpers at the top are shared with the other
test_reconcile_* modules.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import msgspec
import pytest

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode
from gateway.jobs.prompts import fingerprint, normalize
from gateway.jobs.state import Status
from gateway.store import Database, orphans, retention, stale_jobs
from gateway.store.reconcile import apply as store_matches
from gateway.store.reconcile import plan as store_plan
from gateway.store.reconcile import runs
from gateway.usecases import matching, operators
from reconcile.runner import RunOptions, RunResult, run_once
from tests.factories import insert_job

# ---------------------------------------------------------------------------------------
# helpers shared by the test_reconcile_* modules


def payload(
    backend_job_id: str,
    status: str = "completed",
    *,
    kind: Kind = Kind.IMAGE,
    user_id: str | None = None,
    prompt: str | None = None,
    description: str | None = None,
    files: int = 1,
    progress: int | None = None,
) -> dict[str, Any]:
    """A webhook body as the Flask backend sends it (seeds/004), hints optional."""
    body: dict[str, Any] = {
        "job_id": backend_job_id,
        "status": status,
        "timestamp": "2025-10-23T14:30:00.000Z",
        "environment": "development",
    }
    if user_id is not None:
        body["user_id"] = user_id
    if prompt is not None:
        body["original_prompt"] = prompt
    if progress is not None:
        body["progress"] = progress
    if status == "completed":
        reports = [
            {
                "file_path": f"{kind.plural}/{backend_job_id}/{kind.value}_{n}.png",
                "url": f"https://s3.example/{backend_job_id}/{n}",
                "format": "PNG" if kind is Kind.IMAGE else "MP4",
                "size_bytes": 524288,
                "dimensions": "1024x1024" if kind is Kind.IMAGE else "1280x720",
                **({"description": description} if description is not None else {}),
                **({"duration_seconds": 8.0} if kind is Kind.VIDEO else {}),
            }
            for n in range(1, files + 1)
        ]
        body["data"] = {
            "job_id": backend_job_id,
            kind.plural: reports,
            "metadata": {"model_name": "gemini-2.5-flash-image", "version": "1.0",
                         "generation_time_seconds": 12.5},
            "status": "completed",
        }
    if status == "failed":
        body["error_message"] = "Quota API dépassé"
    return body


async def record_orphan(
    db: Database,
    body: dict[str, Any],
    *,
    kind: Kind = Kind.IMAGE,
    seen_ago: float = 0.0,
) -> str:
    """Record one webhook for an unknown id exactly as the receiver does; returns its id."""
    parsed = decode(msgspec.json.encode(body))
    prompt = parsed.hinted_prompt(kind)
    hints = orphans.OrphanHints(
        user_id=parsed.hinted_user_id,
        prompt=prompt,
        prompt_norm=normalize(prompt) if prompt else None,
        file_count=len(parsed.files(kind)),
    )
    key = f"wh_{uuid.uuid4().hex}"
    async with db.transaction() as conn:
        await orphans.lock_backend_id(conn, kind, parsed.job_id)
        await conn.execute(
            "INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, event_status,"
            " outcome) VALUES ($1, $2, $3, $4, 'orphaned')",
            key, kind.value, parsed.job_id, parsed.status,
        )
        await orphans.record(conn, kind, parsed.job_id, dedupe_key=key,
                             event_status=parsed.status, payload=body, hints=hints)
        if seen_ago:
            await conn.execute(
                "UPDATE orphans SET first_seen_at = now() - make_interval(secs => $3)"
                " WHERE kind = $1 AND backend_job_id = $2",
                kind.value, parsed.job_id, seen_ago,
            )
    return parsed.job_id


async def reconcile(database_url: str, **changes: Any) -> RunResult:
    """One pass in this process; grace 0 unless a test is about the grace period."""
    options = RunOptions(**{"grace_seconds": 0.0, "concurrency": 2, **changes})
    db = await Database.open(database_url, min_size=1, max_size=options.concurrency + 2)
    try:
        result = await run_once(db, options)
    finally:
        await db.close()
    assert result is not None
    return result


async def orphan_row(db: Database, backend_job_id: str, kind: Kind = Kind.IMAGE) -> Any:
    row = await db.fetchrow(
        "SELECT * FROM orphans WHERE kind = $1 AND backend_job_id = $2",
        kind.value, backend_job_id,
    )
    assert row is not None
    return row


async def decisions(db: Database, backend_job_id: str) -> list[Any]:
    return await db.fetch(
        "SELECT * FROM reconcile_decisions WHERE backend_job_id = $1 ORDER BY id",
        backend_job_id,
    )


async def job_row(db: Database, job_id: str) -> Any:
    row = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    assert row is not None
    return row


async def snapshot(db: Database) -> dict[str, Any]:
    """Everything a pass may change, except its own audit rows."""
    tables = {
        "jobs": "SELECT id, status, progress, seq, updated_at, first_webhook_at FROM jobs",
        "job_events": "SELECT job_id, seq, status, source FROM job_events",
        "job_files": "SELECT job_id, position, url FROM job_files",
        "notifications": "SELECT job_id, type FROM notifications",
        "job_aliases": "SELECT kind, backend_job_id, job_id, source FROM job_aliases",
        "orphans": "SELECT kind, backend_job_id, state, job_id, resolved_at FROM orphans",
        "orphan_events": "SELECT id, applied_at FROM orphan_events",
        "webhook_deliveries": "SELECT dedupe_key, job_id FROM webhook_deliveries",
        "outbox": "SELECT id FROM outbox",
    }
    return {
        name: sorted(tuple(r.values()) for r in await db.fetch(query))
        for name, query in tables.items()
    }


# ---------------------------------------------------------------------------------------
# an orphan that names its user


async def test_an_orphan_naming_its_user_completes_that_users_job(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="A cat in sunglasses",
                              created_ago_seconds=120)
    backend_id = await record_orphan(
        db, payload("c76c36ee", user_id="user_a", prompt="A cat in sunglasses", files=2)
    )

    result = await reconcile(database_url)

    assert result.counts["matched"] == 1
    job = await job_row(db, job_id)
    assert (job["status"], job["progress"]) == ("COMPLETED", 100)
    assert await db.fetchval("SELECT count(*) FROM job_files WHERE job_id = $1", job_id) == 2
    notes = await db.fetch("SELECT user_id, type FROM notifications WHERE job_id = $1", job_id)
    assert [(n["user_id"], n["type"]) for n in notes] == [("user_a", "IMAGE_COMPLETED")]
    alias = await db.fetchrow("SELECT job_id, source FROM job_aliases WHERE backend_job_id = $1",
                              backend_id)
    assert alias is not None
    assert (alias["job_id"], alias["source"]) == (job_id, "reconciler")
    orphan = await orphan_row(db, backend_id)
    assert (orphan["state"], orphan["job_id"]) == ("matched", job_id)
    (decision,) = await decisions(db, backend_id)
    assert (decision["run_id"], decision["job_id"], decision["rule"], decision["outcome"],
            decision["actor"]) == (result.run_id, job_id, "user_prompt", "matched", "reconciler")
    evidence = decision["evidence"]
    assert evidence["user_id"] == "user_a"
    assert evidence["prompt_fingerprint"] == fingerprint(normalize("A cat in sunglasses"))
    assert evidence["candidates"] == 1
    assert evidence["file_count"] == 2
    assert evidence["job_status"] == "COMPLETED"


async def test_two_users_sending_the_same_prompt_at_the_same_time_each_get_their_own_job(
    db: Database, database_url: str
) -> None:
    job_a = await insert_job(db, user_id="user_a", prompt="a red fox", created_ago_seconds=90)
    job_b = await insert_job(db, user_id="user_b", prompt="a red fox", created_ago_seconds=90)
    # user_b's answer arrives first: order must not decide anything
    orphan_b = await record_orphan(db, payload("bk-b", user_id="user_b", prompt="a red fox"))
    orphan_a = await record_orphan(db, payload("bk-a", user_id="user_a", prompt="a red fox"))

    await reconcile(database_url)

    assert (await orphan_row(db, orphan_a))["job_id"] == job_a
    assert (await orphan_row(db, orphan_b))["job_id"] == job_b
    owners = await db.fetch(
        "SELECT n.user_id, j.user_id AS owner FROM notifications n JOIN jobs j ON j.id = n.job_id"
    )
    assert sorted((r["user_id"], r["owner"]) for r in owners) == [
        ("user_a", "user_a"), ("user_b", "user_b")]


async def test_one_user_sending_the_same_prompt_twice_is_paired_one_to_one_in_time_order(
    db: Database, database_url: str
) -> None:
    first = await insert_job(db, user_id="user_a", prompt="a blue bird", created_ago_seconds=600)
    second = await insert_job(db, user_id="user_a", prompt="a blue bird", created_ago_seconds=300)
    # backend ids sort the other way round from the times they were seen
    early = await record_orphan(db, payload("zz-early", user_id="user_a", prompt="a blue bird"),
                                seen_ago=400)
    late = await record_orphan(db, payload("aa-late", user_id="user_a", prompt="a blue bird"),
                               seen_ago=100)

    result = await reconcile(database_url)

    assert result.counts["matched"] == 2
    assert (await orphan_row(db, early))["job_id"] == first
    assert (await orphan_row(db, late))["job_id"] == second
    assert [d["evidence"]["rank"] for d in await decisions(db, early)] == [1]
    assert [d["evidence"]["rank"] for d in await decisions(db, late)] == [2]


async def test_more_orphans_than_jobs_of_one_user_pair_the_earliest_and_leave_the_rest(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=600)
    first = await record_orphan(db, payload("o-1", user_id="user_a", prompt="a cat"),
                                seen_ago=500)
    second = await record_orphan(db, payload("o-2", user_id="user_a", prompt="a cat"),
                                 seen_ago=400)

    result = await reconcile(database_url)

    assert (await orphan_row(db, first))["job_id"] == job_id
    left = await orphan_row(db, second)
    assert (left["state"], left["job_id"]) == ("unresolved", None)
    (decision,) = await decisions(db, second)
    assert (decision["outcome"], decision["job_id"]) == ("no_candidate", None)
    assert decision["evidence"]["candidates"] == 1
    assert result.needs_review == 1


async def test_a_job_too_old_for_every_orphan_does_not_shift_the_pairing(
    db: Database, database_url: str
) -> None:
    stale = await insert_job(db, user_id="user_a", prompt="a cat",
                             created_ago_seconds=9 * 3600)
    recent = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=600)
    backend_id = await record_orphan(db, payload("o-1", user_id="user_a", prompt="a cat"),
                                     seen_ago=300)

    await reconcile(database_url)

    assert (await orphan_row(db, backend_id))["job_id"] == recent
    assert await db.fetchval("SELECT count(*) FROM job_aliases WHERE job_id = $1", stale) == 0


# ---------------------------------------------------------------------------------------
# an orphan that names no user


async def test_an_orphan_without_user_whose_prompt_two_users_sent_is_left_for_review(
    db: Database, database_url: str
) -> None:
    job_a = await insert_job(db, user_id="user_a", prompt="a red fox", created_ago_seconds=60)
    job_b = await insert_job(db, user_id="user_b", prompt="a red fox", created_ago_seconds=30)
    backend_id = await record_orphan(db, payload("anon-1", prompt="a red fox"))

    result = await reconcile(database_url)

    assert result.counts["ambiguous"] == 1
    assert result.counts["matched"] == 0
    orphan = await orphan_row(db, backend_id)
    assert (orphan["state"], orphan["job_id"]) == ("unresolved", None)
    assert await db.fetchval("SELECT count(*) FROM job_aliases") == 0
    for job_id in (job_a, job_b):
        assert (await job_row(db, job_id))["status"] == "QUEUED"
    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"], decision["job_id"]) == (
        "prompt_only", "ambiguous", None)
    assert decision["evidence"]["candidates"] == 2
    assert sorted(c["user_id"] for c in decision["evidence"]["candidate_jobs"]) == [
        "user_a", "user_b"]
    assert result.needs_review == 1
    assert [(i.backend_job_id, i.outcome) for i in result.review] == [(backend_id, "ambiguous")]


async def test_an_orphan_without_user_matches_the_one_job_with_its_prompt(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_b", prompt="a lighthouse at dawn",
                              created_ago_seconds=60)
    await insert_job(db, user_id="user_a", prompt="something else", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("anon-1", prompt="a lighthouse at dawn"))

    await reconcile(database_url)

    orphan = await orphan_row(db, backend_id)
    assert (orphan["state"], orphan["job_id"]) == ("matched", job_id)
    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"]) == ("prompt_only", "matched")
    assert decision["evidence"]["orphans_with_prompt"] == 1


async def test_an_orphan_without_user_waits_for_review_when_another_orphan_carries_its_prompt(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_b", prompt="a lighthouse",
                              created_ago_seconds=60)
    first = await record_orphan(db, payload("anon-1", prompt="a lighthouse"))
    second = await record_orphan(db, payload("anon-2", prompt="A  Lighthouse"))

    result = await reconcile(database_url)

    assert result.counts["ambiguous"] == 2
    for backend_id in (first, second):
        (decision,) = await decisions(db, backend_id)
        assert decision["outcome"] == "ambiguous"
        assert decision["evidence"]["orphans_with_prompt"] == 2
    assert (await job_row(db, job_id))["status"] == "QUEUED"


async def test_an_orphan_without_user_and_without_candidate_has_no_candidate(
    db: Database, database_url: str
) -> None:
    backend_id = await record_orphan(db, payload("direct-1", prompt="made on the backend"))

    result = await reconcile(database_url)

    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"]) == ("prompt_only", "no_candidate")
    assert result.needs_review == 1


# ---------------------------------------------------------------------------------------
# what is a candidate, and what never is


async def test_an_orphan_never_reaches_another_users_job(db: Database, database_url: str) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_b", prompt="a cat"))

    await reconcile(database_url)

    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"]) == ("user_prompt", "no_candidate")
    assert (await job_row(db, job_id))["status"] == "QUEUED"
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0


async def test_a_job_of_the_other_kind_is_not_a_candidate(
    db: Database, database_url: str
) -> None:
    await insert_job(db, kind=Kind.VIDEO, user_id="user_a", prompt="a cat",
                     created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))

    await reconcile(database_url)

    assert [d["outcome"] for d in await decisions(db, backend_id)] == ["no_candidate"]


@pytest.mark.parametrize("heard", ["first_webhook_at", "delivery", "alias"])
async def test_a_job_that_already_heard_from_the_backend_is_not_a_candidate(
    db: Database, database_url: str, heard: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    if heard == "first_webhook_at":
        await db.execute("UPDATE jobs SET first_webhook_at = now() WHERE id = $1", job_id)
    elif heard == "delivery":
        await db.execute(
            "INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id,"
            " event_status, outcome) VALUES ('k', 'image', $1, $1, 'initializing', 'stale')",
            job_id,
        )
    else:
        await db.execute(
            "INSERT INTO job_aliases (kind, backend_job_id, job_id, source)"
            " VALUES ('image', 'other-backend-id', $1, 'delivery')",
            job_id,
        )
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))

    await reconcile(database_url)

    assert [d["outcome"] for d in await decisions(db, backend_id)] == ["no_candidate"]
    assert (await orphan_row(db, backend_id))["state"] == "unresolved"


@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED, Status.CANCELLED])
async def test_a_finished_job_is_not_a_candidate(
    db: Database, database_url: str, status: Status
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", status=status,
                              created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))

    await reconcile(database_url)

    assert [d["outcome"] for d in await decisions(db, backend_id)] == ["no_candidate"]
    assert (await job_row(db, job_id))["status"] == status.value


async def test_a_completed_orphan_for_a_timed_out_job_completes_it(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a slow video",
                              kind=Kind.VIDEO, status=Status.TIMED_OUT, progress=40,
                              created_ago_seconds=5000)
    backend_id = await record_orphan(
        db, payload("veo-1", kind=Kind.VIDEO, user_id="user_a", prompt="a slow video"),
        kind=Kind.VIDEO, seen_ago=60,
    )

    await reconcile(database_url)

    job = await job_row(db, job_id)
    assert (job["status"], job["progress"]) == ("COMPLETED", 100)
    files = await db.fetch("SELECT duration_seconds FROM job_files WHERE job_id = $1", job_id)
    assert [f["duration_seconds"] for f in files] == [8.0]
    types = await db.fetch("SELECT type FROM notifications WHERE job_id = $1", job_id)
    assert [t["type"] for t in types] == ["VIDEO_COMPLETED"]
    assert (await orphan_row(db, backend_id, Kind.VIDEO))["state"] == "matched"


@pytest.mark.parametrize(
    ("created_ago", "seen_ago", "window", "outcome"),
    [
        (7 * 3600, 0, 6 * 3600, "no_candidate"),  # created before the window
        (7 * 3600, 0, 8 * 3600, "matched"),  # a wider --window reaches it
        (0, 60, 6 * 3600, "no_candidate"),  # created a minute after the orphan was seen
        (0, 3, 6 * 3600, "matched"),  # a few seconds after: clock skew
    ],
)
async def test_candidates_are_created_within_the_window_before_the_orphan(
    db: Database, database_url: str, created_ago: float, seen_ago: float, window: float,
    outcome: str,
) -> None:
    await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=created_ago)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"),
                                     seen_ago=seen_ago)

    await reconcile(database_url, window_seconds=window)

    assert [d["outcome"] for d in await decisions(db, backend_id)] == [outcome]


# ---------------------------------------------------------------------------------------
# the evidence and prompt normalisation


@pytest.mark.parametrize(
    "orphan_prompt",
    [
        "  \uff21 CAT\tin   Sunglasses ",  # fullwidth A (NFKC), tabs, runs of spaces
        "a cat in sunglasses\u3000",  # ideographic space
        "A CAT IN SUNGLASSES",
        "a cat\nin sunglasses",
    ],
)
async def test_prompts_compare_after_nfkc_casefold_and_whitespace_normalisation(
    db: Database, database_url: str, orphan_prompt: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat in sunglasses",
                              created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a",
                                                 prompt=orphan_prompt))

    await reconcile(database_url)

    assert (await orphan_row(db, backend_id))["job_id"] == job_id


async def test_the_file_description_stands_in_for_a_missing_original_prompt(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="Un chat mignon avec des lunettes",
                              created_ago_seconds=60)
    backend_id = await record_orphan(
        db, payload("c76c36ee", description="un chat  mignon avec des lunettes")
    )

    await reconcile(database_url)

    assert (await orphan_row(db, backend_id))["job_id"] == job_id


async def test_progress_events_then_completion_are_replayed_in_received_order(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    for status, progress in (("initializing", 25), ("generating", 60), ("saving", 90)):
        await record_orphan(db, payload("bk-1", status, user_id="user_a", prompt="a cat",
                                        progress=progress))
    await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))

    await reconcile(database_url)

    events = await db.fetch("SELECT status, source FROM job_events WHERE job_id = $1 ORDER BY seq",
                            job_id)
    assert [e["status"] for e in events] == ["INITIALIZING", "GENERATING", "SAVING", "COMPLETED"]
    assert {e["source"] for e in events} == {"reconciler"}
    assert await db.fetchval("SELECT count(*) FROM notifications") == 1


async def test_an_orphan_without_a_prompt_is_left_for_review(
    db: Database, database_url: str
) -> None:
    await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", "generating", user_id="user_a",
                                                 progress=50))

    result = await reconcile(database_url)

    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"]) == ("no_prompt", "no_candidate")
    assert result.needs_review == 1


# ---------------------------------------------------------------------------------------
# aliases, the grace period and expiry


async def test_an_orphan_whose_events_arrived_before_the_alias_is_applied_once_it_is_known(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    # no user, no prompt: only the alias can place it
    backend_id = await record_orphan(db, payload("backend-own-id", "generating", progress=60))
    await record_orphan(db, payload("backend-own-id"))
    # delivery learned the backend's own id afterwards and recorded the alias
    await db.execute(
        "INSERT INTO job_aliases (kind, backend_job_id, job_id, source)"
        " VALUES ('image', $1, $2, 'delivery')",
        backend_id, job_id,
    )

    result = await reconcile(database_url, grace_seconds=3600)

    assert result.counts["matched"] == 1
    job = await job_row(db, job_id)
    assert (job["status"], job["progress"]) == ("COMPLETED", 100)
    orphan = await orphan_row(db, backend_id)
    assert (orphan["state"], orphan["job_id"]) == ("matched", job_id)
    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"], decision["job_id"]) == (
        "alias", "matched", job_id)
    linked = await db.fetch("SELECT job_id FROM webhook_deliveries WHERE backend_job_id = $1",
                            backend_id)
    assert {r["job_id"] for r in linked} == {job_id}


async def test_an_unmatched_orphan_still_reaches_its_job_once_the_alias_is_known(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("backend-own-id"), seen_ago=90000)
    await reconcile(database_url)
    assert (await orphan_row(db, backend_id))["state"] == "unmatched"
    await db.execute(
        "INSERT INTO job_aliases (kind, backend_job_id, job_id, source)"
        " VALUES ('image', $1, $2, 'delivery')",
        backend_id, job_id,
    )

    await reconcile(database_url)

    assert (await orphan_row(db, backend_id))["state"] == "matched"
    assert (await job_row(db, job_id))["status"] == "COMPLETED"


async def test_an_orphan_within_the_grace_period_waits(db: Database, database_url: str) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"),
                                     seen_ago=10)

    result = await reconcile(database_url, grace_seconds=60)

    assert result.counts["waiting"] == 1
    assert result.needs_review == 0
    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"]) == ("grace", "waiting")
    assert (await job_row(db, job_id))["status"] == "QUEUED"
    assert (await orphan_row(db, backend_id))["state"] == "unresolved"

    await db.execute("UPDATE orphans SET first_seen_at = now() - interval '61 seconds'")
    await reconcile(database_url, grace_seconds=60)

    assert (await orphan_row(db, backend_id))["job_id"] == job_id


async def test_an_orphan_unmatched_after_expire_after_is_kept_listed_and_counted(
    db: Database, database_url: str
) -> None:
    backend_id = await record_orphan(db, payload("direct-1", user_id="user_a", prompt="x"),
                                     seen_ago=25 * 3600)

    result = await reconcile(database_url)

    assert result.counts["expired"] == 1
    orphan = await orphan_row(db, backend_id)
    assert (orphan["state"], orphan["job_id"]) == ("unmatched", None)
    (decision,) = await decisions(db, backend_id)
    assert decision["outcome"] == "expired"
    assert decision["evidence"]["outcome_before_expiry"] == "no_candidate"
    assert await db.fetchval("SELECT count(*) FROM orphan_events") == 1  # never deleted
    assert result.needs_review == 1
    assert result.open_orphans == {"unresolved": 0, "unmatched": 1}

    again = await reconcile(database_url)

    assert again.counts["looked_at"] == 0  # expired orphans are not decided again
    assert len(await decisions(db, backend_id)) == 1
    assert [(i.backend_job_id, i.state) for i in again.review] == [(backend_id, "unmatched")]
    assert again.needs_review == 1
    listed = [r async for r in operators.list_orphans(db, "unmatched")]
    assert [r["backend_job_id"] for r in listed] == [backend_id]


async def test_expire_after_is_a_flag(db: Database, database_url: str) -> None:
    backend_id = await record_orphan(db, payload("direct-1", user_id="user_a", prompt="x"),
                                     seen_ago=3 * 3600)

    await reconcile(database_url, expire_after_seconds=2 * 3600)

    assert (await orphan_row(db, backend_id))["state"] == "unmatched"


# ---------------------------------------------------------------------------------------
# runs: idempotent, recorded, dry runs, one failing orphan


async def _mixed_situation(db: Database) -> None:
    await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=120)
    await insert_job(db, user_id="user_b", prompt="a red fox", created_ago_seconds=120)
    await insert_job(db, user_id="user_c", prompt="a red fox", created_ago_seconds=120)
    await insert_job(db, user_id="user_d", prompt="stuck", created_ago_seconds=3600)
    await db.execute("UPDATE jobs SET updated_at = now() - interval '20 minutes'"
                     " WHERE prompt = 'stuck'")
    await record_orphan(db, payload("m-1", user_id="user_a", prompt="a cat"), seen_ago=90)
    await record_orphan(db, payload("amb-1", prompt="a red fox"), seen_ago=90)
    await record_orphan(db, payload("exp-1", prompt="old"), seen_ago=30 * 3600)
    await record_orphan(db, payload("wait-1", user_id="user_a", prompt="soon"), seen_ago=1)


async def test_a_second_run_right_after_the_first_changes_nothing(
    db: Database, database_url: str
) -> None:
    await _mixed_situation(db)
    first = await reconcile(database_url, grace_seconds=60)
    assert (first.counts["matched"], first.counts["ambiguous"], first.counts["expired"],
            first.counts["waiting"], first.counts["timed_out"]["image"]) == (1, 1, 1, 1, 1)
    before = await snapshot(db)

    second = await reconcile(database_url, grace_seconds=60)

    assert await snapshot(db) == before
    assert (second.counts["matched"], second.counts["expired"],
            second.counts["timed_out"]["image"]) == (0, 0, 0)


async def test_a_match_that_frees_a_prompt_is_made_in_the_same_run_not_the_next(
    db: Database, database_url: str
) -> None:
    # user_a's orphan takes user_a's job; the orphan without user then has one job left
    # with its prompt and is the only open orphan carrying it: one run decides both, so a
    # second run finds nothing more to do
    job_a = await insert_job(db, user_id="user_a", prompt="a red fox", created_ago_seconds=60)
    job_b = await insert_job(db, user_id="user_b", prompt="a red fox", created_ago_seconds=30)
    named = await record_orphan(db, payload("named-1", user_id="user_a", prompt="a red fox"))
    anonymous = await record_orphan(db, payload("anon-1", prompt="a red fox"))

    first = await reconcile(database_url)
    second = await reconcile(database_url)

    assert (first.counts["matched"], second.counts["matched"]) == (2, 0)
    assert (await orphan_row(db, named))["job_id"] == job_a
    assert (await orphan_row(db, anonymous))["job_id"] == job_b
    (decision,) = await decisions(db, anonymous)
    assert (decision["rule"], decision["outcome"]) == ("prompt_only", "matched")


async def test_a_dry_run_reports_what_a_run_would_do_and_changes_nothing(
    db: Database, database_url: str
) -> None:
    await _mixed_situation(db)
    await db.execute(
        "INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, event_status,"
        " outcome, received_at) VALUES ('old', 'image', 'x', 'completed', 'applied',"
        " now() - interval '8 days')"
    )
    before = await snapshot(db)

    dry = await reconcile(database_url, grace_seconds=60, dry_run=True)

    assert await snapshot(db) == before
    assert await db.fetchval("SELECT count(*) FROM reconcile_decisions") == 0
    assert await db.fetchval("SELECT count(*) FROM reconcile_plan") == 0
    assert await db.fetchval("SELECT dry_run FROM reconcile_runs WHERE id = $1", dry.run_id)
    assert (dry.counts["matched"], dry.counts["ambiguous"], dry.counts["expired"],
            dry.counts["waiting"]) == (1, 1, 1, 1)
    assert dry.counts["timed_out"] == {"image": 1, "video": 0}
    assert dry.counts["pruned"]["webhook_deliveries"] == 1
    assert dry.needs_review == 2

    real = await reconcile(database_url, grace_seconds=60)
    assert {k: real.counts[k] for k in ("matched", "ambiguous", "expired", "waiting")} == {
        k: dry.counts[k] for k in ("matched", "ambiguous", "expired", "waiting")}


async def test_each_run_is_recorded_with_its_counts(db: Database, database_url: str) -> None:
    await _mixed_situation(db)

    result = await reconcile(database_url, grace_seconds=60)

    run = await db.fetchrow("SELECT * FROM reconcile_runs WHERE id = $1", result.run_id)
    assert run is not None
    assert (run["state"], run["dry_run"], run["error"]) == ("succeeded", False, None)
    assert run["started_at"] <= run["finished_at"]
    assert run["counts"]["matched"] == 1
    assert run["counts"]["needs_review"] == 2
    assert run["counts"]["looked_at"] == 4
    per_run = await db.fetchval(
        "SELECT count(*) FROM reconcile_decisions WHERE run_id = $1", result.run_id)
    assert per_run == 4  # a decision row for every orphan looked at


async def test_an_orphan_whose_replay_fails_is_left_untouched_and_the_others_are_applied(
    db: Database, database_url: str
) -> None:
    good_job = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    bad_job = await insert_job(db, user_id="user_b", prompt="a dog", created_ago_seconds=60)
    good = await record_orphan(db, payload("good", user_id="user_a", prompt="a cat"))
    bad = await record_orphan(db, payload("bad", user_id="user_b", prompt="a dog"))
    # a second stored event of the bad orphan no longer fits the payload schema
    await db.execute(
        "INSERT INTO orphan_events (kind, backend_job_id, dedupe_key, event_status, payload)"
        " VALUES ('image', $1, 'broken', 'completed', '{\"job_id\": \"bad\", \"status\": 7}')",
        bad,
    )

    result = await reconcile(database_url)

    assert result.state == "failed"
    assert result.counts["apply_failed"] == 1
    assert (await orphan_row(db, good))["job_id"] == good_job
    left = await orphan_row(db, bad)
    assert (left["state"], left["job_id"]) == ("unresolved", None)
    job = await job_row(db, bad_job)
    assert (job["status"], job["seq"]) == ("QUEUED", 1)  # not even the first event applied
    assert await db.fetchval("SELECT count(*) FROM job_aliases WHERE job_id = $1", bad_job) == 0
    (decision,) = await decisions(db, bad)
    assert (decision["rule"], decision["outcome"]) == ("apply_failed", "waiting")
    run = await db.fetchrow("SELECT state, error FROM reconcile_runs WHERE id = $1",
                            result.run_id)
    assert run is not None
    assert run["state"] == "failed"
    assert "bad" in run["error"]


async def test_a_planned_match_is_withdrawn_when_the_job_heard_from_the_backend_meanwhile(
    db: Database,
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))
    async with db.connection() as conn:
        run = await runs.start_run(conn, dry_run=False)
        await store_plan.build_plan(conn, run.id, store_plan.PlanParameters(
            run_at=run.started_at, grace_seconds=0, window_seconds=3600,
            expire_after_seconds=86400, skew_seconds=5))
        (planned,) = [m async for m in store_matches.planned_matches(conn, run.id)]
    assert planned.job_id == job_id
    # the backend reports under our own id after the plan was made
    await db.execute("UPDATE jobs SET first_webhook_at = now() WHERE id = $1", job_id)

    async with db.transaction() as conn:
        outcome = await matching.apply_match(conn, run.id, planned)

    assert not outcome.matched
    assert outcome.reason == "the job heard from the backend under its own id meanwhile"
    assert (await orphan_row(db, backend_id))["state"] == "unresolved"
    (decision,) = await decisions(db, backend_id)
    assert (decision["rule"], decision["outcome"]) == ("recheck", "waiting")


async def test_a_second_run_while_one_holds_the_lock_does_nothing(
    db: Database, database_url: str
) -> None:
    await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))
    async with db.connection() as holder:
        assert await runs.try_run_lock(holder)
        second = await run_once(db, RunOptions(grace_seconds=0, concurrency=1))
        await runs.release_run_lock(holder)

    assert second is None
    assert (await orphan_row(db, backend_id))["state"] == "unresolved"
    assert await db.fetchval("SELECT count(*) FROM reconcile_runs") == 0


async def test_a_run_left_running_by_a_dead_process_is_marked_failed(
    db: Database, database_url: str
) -> None:
    dead = await db.fetchval("INSERT INTO reconcile_runs DEFAULT VALUES RETURNING id")

    await reconcile(database_url)

    row = await db.fetchrow("SELECT state, error FROM reconcile_runs WHERE id = $1", dead)
    assert row is not None
    assert (row["state"], row["error"]) == ("failed", "interrupted before it finished")


# ---------------------------------------------------------------------------------------
# stale jobs and retention


async def test_active_jobs_unchanged_past_their_kinds_timeout_time_out_with_a_notification(
    db: Database, database_url: str
) -> None:
    async def job(kind: Kind, minutes: float, status: Status = Status.QUEUED) -> str:
        job_id = await insert_job(db, kind=kind, status=status, progress=30)
        await db.execute(
            "UPDATE jobs SET updated_at = now() - make_interval(mins => $2) WHERE id = $1",
            job_id, minutes)
        return job_id

    stale_image = await job(Kind.IMAGE, 16, Status.GENERATING)
    fresh_image = await job(Kind.IMAGE, 14)
    pending_video = await job(Kind.VIDEO, 30)
    stale_video = await job(Kind.VIDEO, 61, Status.PENDING)
    old_but_done = await job(Kind.IMAGE, 120, Status.COMPLETED)

    result = await reconcile(database_url)

    assert result.counts["timed_out"] == {"image": 1, "video": 1}
    status = {r["id"]: (r["status"], r["progress"]) for r in await db.fetch(
        "SELECT id, status, progress FROM jobs")}
    assert status[stale_image] == ("TIMED_OUT", 30)
    assert status[stale_video] == ("TIMED_OUT", 30)
    assert status[fresh_image][0] == "QUEUED"
    assert status[pending_video][0] == "QUEUED"
    assert status[old_but_done][0] == "COMPLETED"
    notes = await db.fetch("SELECT job_id, type, message FROM notifications ORDER BY type")
    assert [(n["job_id"], n["type"]) for n in notes] == [
        (stale_image, "IMAGE_TIMED_OUT"), (stale_video, "VIDEO_TIMED_OUT")]
    assert "15 minutes" in notes[0]["message"]
    sources = await db.fetch("SELECT source FROM job_events WHERE job_id = $1", stale_image)
    assert [s["source"] for s in sources] == ["timeout"]


async def test_every_job_timed_out_in_concurrent_batches_is_counted(
    db: Database, database_url: str
) -> None:
    await db.execute(
        "INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, updated_at)"
        " SELECT 'stale-' || g, 'image', 'user_a', 'p', 'p', now() - interval '1 hour'"
        " FROM generate_series(1, 450) AS g"
    )

    result = await reconcile(database_url, concurrency=4)

    assert result.counts["timed_out"] == {"image": 450, "video": 0}
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'TIMED_OUT'") == 450
    assert await db.fetchval("SELECT count(*) FROM notifications") == 450


async def test_a_batch_commits_asynchronously_and_its_connection_waits_for_flushes_after(
    db: Database,
) -> None:
    job_id = await insert_job(db)
    cutoff = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    async with db.connection() as conn:
        async with conn.transaction():
            assert await stale_jobs.time_out(conn, [job_id], cutoff, "late") == 1
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        async with conn.transaction():
            await matching.apply_matches(conn, 0, [])
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_job_timeouts_come_from_the_settings(db: Database, database_url: str) -> None:
    job_id = await insert_job(db)
    await db.execute("UPDATE jobs SET updated_at = now() - interval '5 minutes'")

    await reconcile(database_url, image_timeout_seconds=240)

    assert (await job_row(db, job_id))["status"] == "TIMED_OUT"


async def test_old_dedupe_records_and_delivered_outbox_rows_are_pruned_in_batches(
    db: Database,
) -> None:
    for n in range(5):
        await db.execute(
            "INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, event_status,"
            " outcome, received_at) VALUES ($1, 'image', 'b', 'completed', 'applied',"
            " now() - make_interval(days => $2))",
            f"k{n}", 8 if n < 3 else 6,
        )
    ages = {"old-delivered": (8, True, False), "new-delivered": (6, True, False),
            "old-due": (8, False, False), "old-failed": (8, False, True)}
    for name, (days, delivered, failed) in ages.items():
        job_id = await insert_job(db, job_id=name)
        await db.execute(
            "INSERT INTO outbox (job_id, action, payload, created_at, delivered_at, failed_at)"
            " VALUES ($1, 'generate', NULL, now() - make_interval(days => $2),"
            " CASE WHEN $3 THEN now() - make_interval(days => $2) END,"
            " CASE WHEN $4 THEN now() - make_interval(days => $2) END)",
            job_id, days, delivered, failed,
        )
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)

    async with db.connection() as conn:
        assert await retention.count_prunable(conn, cutoff) == {"webhook_deliveries": 3,
                                                            "outbox": 1}
        pruned = await retention.prune(conn, cutoff, batch=2)

    assert pruned == {"webhook_deliveries": 3, "outbox": 1}
    kept = await db.fetch("SELECT dedupe_key FROM webhook_deliveries ORDER BY dedupe_key")
    assert [k["dedupe_key"] for k in kept] == ["k3", "k4"]
    outbox = await db.fetch("SELECT job_id FROM outbox ORDER BY job_id")
    assert [o["job_id"] for o in outbox] == ["new-delivered", "old-due", "old-failed"]


async def test_a_run_prunes_with_the_retention_setting(db: Database, database_url: str) -> None:
    await db.execute(
        "INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, event_status,"
        " outcome, received_at) VALUES ('k', 'image', 'b', 'completed', 'applied',"
        " now() - interval '2 hours')"
    )

    result = await reconcile(database_url, retention_seconds=3600)

    assert result.counts["pruned"]["webhook_deliveries"] == 1
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 0


# ---------------------------------------------------------------------------------------
# operators


async def test_an_operator_assignment_is_applied_and_recorded_with_the_reason(
    db: Database, database_url: str
) -> None:
    job_a = await insert_job(db, user_id="user_a", prompt="a red fox", created_ago_seconds=60)
    await insert_job(db, user_id="user_b", prompt="a red fox", created_ago_seconds=60)
    backend_id = await record_orphan(db, payload("anon-1", prompt="a red fox"))
    await reconcile(database_url)  # ambiguous: left for review

    done = await operators.assign(db, backend_id, job_a, reason="user_a confirmed by mail")

    assert (done.kind, done.job_status, done.replayed) == (Kind.IMAGE, "COMPLETED", 1)
    orphan = await orphan_row(db, backend_id)
    assert (orphan["state"], orphan["job_id"]) == ("assigned", job_a)
    alias = await db.fetchval("SELECT source FROM job_aliases WHERE backend_job_id = $1",
                              backend_id)
    assert alias == "operator"
    last = (await decisions(db, backend_id))[-1]
    assert (last["run_id"], last["outcome"], last["rule"], last["actor"], last["reason"],
            last["job_id"]) == (None, "assigned", "operator", "operator",
                                "user_a confirmed by mail", job_a)
    assert (await job_row(db, job_a))["status"] == "COMPLETED"


async def test_an_operator_dismissal_closes_the_orphan_and_keeps_its_events(
    db: Database, database_url: str
) -> None:
    backend_id = await record_orphan(db, payload("direct-1", user_id="user_a", prompt="x"))

    done = await operators.dismiss(db, backend_id, reason="test call from the backend team")

    assert done.previous_state == "unresolved"
    orphan = await orphan_row(db, backend_id)
    assert orphan["state"] == "dismissed"
    assert orphan["resolved_at"] is not None
    (decision,) = await decisions(db, backend_id)
    assert (decision["outcome"], decision["actor"], decision["reason"]) == (
        "dismissed", "operator", "test call from the backend team")
    assert await db.fetchval("SELECT count(*) FROM orphan_events") == 1
    after = await reconcile(database_url)
    assert after.counts["looked_at"] == 0


async def test_an_operator_cannot_give_an_orphan_to_another_users_job_by_accident(
    db: Database,
) -> None:
    job_b = await insert_job(db, user_id="user_b", prompt="a cat")
    backend_id = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))

    with pytest.raises(operators.OperatorError, match="--allow-other-user"):
        await operators.assign(db, backend_id, job_b, reason="oops")

    assert (await orphan_row(db, backend_id))["state"] == "unresolved"
    assert await db.fetchval("SELECT count(*) FROM reconcile_decisions") == 0
    done = await operators.assign(db, backend_id, job_b, reason="backend sent a wrong user",
                                  allow_other_user=True)
    assert done.job_id == job_b


async def test_an_operator_cannot_reassign_a_matched_orphan_or_give_a_job_two_backend_ids(
    db: Database, database_url: str
) -> None:
    job_id = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    other_job = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=60)
    matched = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="a cat"))
    await reconcile(database_url)
    taken = (await orphan_row(db, matched))["job_id"]
    second = await record_orphan(db, payload("bk-2", user_id="user_a", prompt="a dog"))

    with pytest.raises(operators.OperatorError, match="matched already"):
        await operators.assign(db, matched, other_job if taken == job_id else job_id,
                               reason="r")
    with pytest.raises(operators.OperatorError, match="already has another backend job id"):
        await operators.assign(db, second, taken, reason="r")
    with pytest.raises(operators.OperatorError, match="no orphan has backend job id"):
        await operators.assign(db, "nope", job_id, reason="r")
    with pytest.raises(operators.OperatorError, match="no job has id"):
        await operators.assign(db, second, "nope", reason="r")


async def test_the_orphans_kind_is_inferred_unless_two_kinds_share_the_id(
    db: Database,
) -> None:
    await record_orphan(db, payload("shared", prompt="x"))
    await record_orphan(db, payload("shared", kind=Kind.VIDEO, prompt="x"), kind=Kind.VIDEO)

    with pytest.raises(operators.OperatorError, match="pass --kind"):
        await operators.dismiss(db, "shared", reason="r")
    done = await operators.dismiss(db, "shared", reason="r", kind=Kind.VIDEO)

    assert done.kind is Kind.VIDEO
    assert (await orphan_row(db, "shared", Kind.IMAGE))["state"] == "unresolved"


async def test_anonymous_orphans_whose_candidates_are_all_one_users_pair_in_time_order(
    db: Database, database_url: str
) -> None:
    older = await insert_job(db, user_id="user_a", prompt="blue whale", created_ago_seconds=300)
    newer = await insert_job(db, user_id="user_a", prompt="blue whale", created_ago_seconds=200)
    first = await record_orphan(db, payload("anon-1", prompt="blue whale"))
    second = await record_orphan(db, payload("anon-2", prompt="Blue  Whale"))

    result = await reconcile(database_url)

    assert result.counts["matched"] == 2
    assert (await orphan_row(db, first))["job_id"] == older
    assert (await orphan_row(db, second))["job_id"] == newer
    (decision,) = await decisions(db, second)
    assert (decision["rule"], decision["outcome"]) == ("one_user_prompt", "matched")


async def test_anonymous_orphans_whose_candidates_belong_to_two_users_wait_for_review(
    db: Database, database_url: str
) -> None:
    await insert_job(db, user_id="user_a", prompt="green forest", created_ago_seconds=300)
    await insert_job(db, user_id="user_b", prompt="green forest", created_ago_seconds=290)
    first = await record_orphan(db, payload("anon-1", prompt="green forest"))
    second = await record_orphan(db, payload("anon-2", prompt="green forest"))

    result = await reconcile(database_url)

    assert result.counts["matched"] == 0
    for backend_id in (first, second):
        (decision,) = await decisions(db, backend_id)
        assert (decision["rule"], decision["outcome"]) == ("prompt_only", "ambiguous")
