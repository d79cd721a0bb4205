"""attach_many writes exactly what attach writes pair by pair, and refuses what it refuses."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode_stored
from gateway.jobs.records import LockedJob
from gateway.jobs.state import Status
from gateway.store import Database, Duplicate, orphans
from gateway.store import jobs as store_jobs
from gateway.store.database import translate_errors
from tests.factories import insert_job
from tests.test_reconcile import payload, record_orphan

# every id of a set starts with its prefix, so the sets compare once it is stripped
REFERENCE, ONE_BY_ONE, BATCHED = "R:", "A:", "B:"

_STARTS = [(Status.PENDING, 0), (Status.QUEUED, 0), (Status.QUEUED, 0), (Status.GENERATING, 40),
           (Status.SAVING, 90), (Status.TIMED_OUT, 40), (Status.FAILED, 0)]
_PROGRESS = ["queued", "initializing", "generating", "saving"]
_ENDS = ["completed", "completed", "failed", "cancelled", "timed_out", None]


def scenario(seed: int, size: int) -> list[dict[str, Any]]:
    """Jobs in various states and orphans whose events mostly go forward, some out of
    order, some repeated, some after the end; messages on some events only."""
    rng = random.Random(seed)
    cases = []
    for i in range(size):
        kind = rng.choice(list(Kind))
        status, progress = rng.choice(_STARTS)
        words = sorted(rng.sample(_PROGRESS, rng.randint(0, 4)), key=_PROGRESS.index)
        if (end := rng.choice(_ENDS)) is not None:
            words.append(end)
        if len(words) > 1 and rng.random() < 0.3:
            j = rng.randrange(len(words) - 1)
            words[j], words[j + 1] = words[j + 1], words[j]
        if words and rng.random() < 0.2:
            words.append(rng.choice(words))
        events = [{"status": word, "progress": rng.choice([None, 10, 55, 90]),
                   "files": rng.choice([0, 1, 2]),
                   "message": rng.choice([None, None, f"step {i}", "working"])}
                  for word in words]
        cases.append({"i": i, "kind": kind, "status": status, "progress": progress,
                      "user": f"user-{i % 4}", "events": events})
    return cases


async def arrange(db: Database, ns: str, cases: list[dict[str, Any]]) -> list[tuple[Kind, str,
                                                                                    str]]:
    """The jobs, the orphans' events, and aliases that make some pairs conflict."""
    pairs = []
    for case in cases:
        kind, i = case["kind"], case["i"]
        job_id = await insert_job(db, job_id=f"{ns}job-{i}", kind=kind,
                                  user_id=f"{ns}{case['user']}", status=case["status"],
                                  progress=case["progress"])
        backend_id = f"{ns}bk-{i}"
        for e in case["events"]:
            body = payload(backend_id, e["status"], kind=kind, user_id=f"{ns}{case['user']}",
                           files=e["files"], progress=e["progress"])
            if e["message"] is not None:
                body["message"] = e["message"]
            await record_orphan(db, body, kind=kind)
        pairs.append((kind, backend_id, job_id))
    # a backend id already another job's, a job that already has a backend id, and a
    # backend id offered to two jobs of the same batch
    other = await insert_job(db, job_id=f"{ns}other", kind=pairs[1][0])
    await db.execute("INSERT INTO job_aliases (kind, backend_job_id, job_id, source) "
                     "VALUES ($1, $2, $3, 'delivery')", pairs[1][0].value, pairs[1][1], other)
    await db.execute("INSERT INTO job_aliases (kind, backend_job_id, job_id, source) "
                     "VALUES ($1, $2, $3, 'delivery')", pairs[2][0].value, f"{ns}elsewhere",
                     pairs[2][2])
    twin = await insert_job(db, job_id=f"{ns}twin", kind=pairs[3][0])
    pairs.insert(4, (pairs[3][0], pairs[3][1], twin))
    # a backend id without any orphan (delivery learning the backend's id first)
    lone = await insert_job(db, job_id=f"{ns}lone")
    pairs.append((Kind.IMAGE, f"{ns}bk-lone", lone))
    return pairs


def outcome(result: orphans.Attached | None) -> Any:
    if result is None:
        return "refused"
    return ([(t.outcome.value, t.state.status.value, t.state.progress)
             for t in result.transitions], len(result.notification_ids),
            result.job.state, result.job.seq)


async def attach_one_by_one(db: Database, pairs: list[tuple[Kind, str, str]]) -> list[Any]:
    results = []
    for kind, backend_id, job_id in pairs:
        try:
            async with db.transaction() as conn:
                job = await store_jobs.lock(conn, job_id)
                assert job is not None
                results.append(outcome(
                    await orphans.attach(conn, kind, backend_id, job, source="reconciler")))
        except Duplicate:
            results.append(outcome(None))
    return results


async def replay_event_by_event(
    conn: Any, kind: Kind, backend_id: str, job: LockedJob
) -> orphans.Attached:
    """The reference: the alias, then one `jobs.apply` (one UPDATE) per stored event."""
    await orphans.lock_backend_id(conn, kind, backend_id)
    with translate_errors():
        owner = await conn.fetchval(
            "INSERT INTO job_aliases (kind, backend_job_id, job_id, source) "
            "VALUES ($1, $2, $3, 'reconciler') ON CONFLICT (kind, backend_job_id) DO NOTHING "
            "RETURNING job_id", kind.value, backend_id, job.id)
    if owner is None and await conn.fetchval(
            "SELECT job_id FROM job_aliases WHERE kind = $1 AND backend_job_id = $2",
            kind.value, backend_id) != job.id:
        raise Duplicate("taken")
    events = await conn.fetch(
        "SELECT id, dedupe_key, payload FROM orphan_events WHERE kind = $1 AND "
        "backend_job_id = $2 AND applied_at IS NULL ORDER BY received_at, id",
        kind.value, backend_id)
    transitions, notifications = [], []
    for event in events:
        update = decode_stored(event["payload"]).to_update(kind, source="reconciler")
        applied = await store_jobs.apply(conn, job, update)
        transitions.append(applied.transition)
        if applied.notification_id is not None:
            notifications.append(applied.notification_id)
        job = dataclasses.replace(job, state=applied.transition.state, seq=applied.seq)
    if events:
        await conn.execute("UPDATE orphan_events SET applied_at = now() "
                           "WHERE id = ANY($1::bigint[])", [e["id"] for e in events])
        await conn.execute("UPDATE webhook_deliveries SET job_id = $1 "
                           "WHERE dedupe_key = ANY($2::text[])",
                           job.id, [e["dedupe_key"] for e in events])
        await conn.execute("UPDATE orphans SET state = 'matched', job_id = $3, "
                           "resolved_at = now() WHERE kind = $1 AND backend_job_id = $2",
                           kind.value, backend_id, job.id)
    return orphans.Attached(job, tuple(transitions), tuple(notifications))


async def attach_event_by_event(db: Database, pairs: list[tuple[Kind, str, str]]) -> list[Any]:
    results = []
    for kind, backend_id, job_id in pairs:
        try:
            async with db.transaction() as conn:
                job = await store_jobs.lock(conn, job_id)
                assert job is not None
                results.append(outcome(await replay_event_by_event(conn, kind, backend_id, job)))
        except Duplicate:
            results.append(outcome(None))
    return results


async def attach_batched(db: Database, pairs: list[tuple[Kind, str, str]]) -> list[Any]:
    async with db.transaction() as conn:
        locked = await store_jobs.lock_many(conn, [job_id for _, _, job_id in pairs])
        done = await orphans.attach_many(
            conn, [orphans.Pair(kind, backend_id, locked[job_id])
                   for kind, backend_id, job_id in pairs], source="reconciler")
    return [outcome(None if isinstance(r, orphans.Refused) else r) for r in done]


def strip(value: Any, ns: str) -> Any:
    if isinstance(value, str):
        return value.replace(ns, "")
    if isinstance(value, dict):
        return {k: strip(v, ns) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strip(v, ns) for v in value]
    return value


QUERIES = {
    "jobs": """SELECT id, status, progress, seq, message, error_message, model_name,
                      generation_time_seconds, first_webhook_at IS NULL AS unheard,
                      finished_at IS NULL AS unfinished, updated_at > created_at AS changed
               FROM jobs WHERE id LIKE $1 ORDER BY id""",
    "job_events": """SELECT job_id, seq, status, progress, message, source FROM job_events
                     WHERE job_id LIKE $1 ORDER BY job_id, seq""",
    "job_files": """SELECT job_id, position, url, storage_key, filename, format, size_bytes,
                           width, height, duration_seconds, description
                    FROM job_files WHERE job_id LIKE $1 ORDER BY job_id, position""",
    "notifications": """SELECT user_id, job_id, type, title, message, metadata
                        FROM notifications WHERE job_id LIKE $1 ORDER BY job_id, id""",
    "orphans": """SELECT kind, backend_job_id, state, job_id, resolved_at IS NULL AS open,
                         event_count, file_count
                  FROM orphans WHERE backend_job_id LIKE $1 ORDER BY kind, backend_job_id""",
    "orphan_events": """SELECT backend_job_id, event_status, applied_at IS NULL AS pending
                        FROM orphan_events WHERE backend_job_id LIKE $1 ORDER BY id""",
    "job_aliases": """SELECT kind, backend_job_id, job_id, source FROM job_aliases
                      WHERE job_id LIKE $1 ORDER BY kind, backend_job_id""",
    "webhook_deliveries": """SELECT backend_job_id, event_status, job_id, outcome
                             FROM webhook_deliveries WHERE backend_job_id LIKE $1
                             ORDER BY received_at, dedupe_key""",
}


async def rows(db: Database, ns: str) -> dict[str, Any]:
    return {table: strip([dict(r) for r in await db.fetch(query, f"{ns}%")], ns)
            for table, query in QUERIES.items()}


async def test_attach_many_writes_what_attach_writes_pair_by_pair(db: Database) -> None:
    cases = scenario(seed=5, size=50)
    reference = await attach_event_by_event(db, await arrange(db, REFERENCE, cases))
    one = await attach_one_by_one(db, await arrange(db, ONE_BY_ONE, cases))
    batched = await attach_batched(db, await arrange(db, BATCHED, cases))

    assert strip(one, ONE_BY_ONE) == strip(reference, REFERENCE)
    assert strip(batched, BATCHED) == strip(reference, REFERENCE)
    assert reference[1] == reference[2] == reference[4] == "refused"
    assert reference.count("refused") == 3
    expected = await rows(db, REFERENCE)
    for ns in (ONE_BY_ONE, BATCHED):
        actual = await rows(db, ns)
        for table in QUERIES:
            assert actual[table] == expected[table], (ns, table)
    # the scenario exercises what it is meant to
    assert {n["type"] for n in expected["notifications"]} >= {
        "IMAGE_COMPLETED", "VIDEO_COMPLETED", "IMAGE_FAILED"}
    assert expected["job_files"]
    assert {o["state"] for o in expected["orphans"]} == {"matched", "unresolved"}


async def test_attach_many_of_a_refused_pair_leaves_it_and_applies_the_others(
    db: Database,
) -> None:
    await record_orphan(db, payload("bk-1", "completed", user_id="user_a"))
    await record_orphan(db, payload("bk-2", "completed", user_id="user_a"))
    first, second, third = [await insert_job(db) for _ in range(3)]
    await db.execute("INSERT INTO job_aliases (kind, backend_job_id, job_id, source) "
                     "VALUES ('image', 'bk-1', $1, 'delivery')", first)
    async with db.transaction() as conn:
        locked = await store_jobs.lock_many(conn, [second, third])
        refused, attached = await orphans.attach_many(
            conn, [orphans.Pair(Kind.IMAGE, "bk-1", locked[second]),
                   orphans.Pair(Kind.IMAGE, "bk-2", locked[third])], source="reconciler")
    assert isinstance(refused, orphans.Refused)
    assert refused.reason == f"backend job id already belongs to job {first}"
    assert isinstance(attached, orphans.Attached)
    assert attached.job.state.status is Status.COMPLETED
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", second) == "QUEUED"
    assert await db.fetchval(
        "SELECT state FROM orphans WHERE backend_job_id = 'bk-1'") == "unresolved"
    assert await db.fetchval(
        "SELECT state FROM orphans WHERE backend_job_id = 'bk-2'") == "matched"


async def test_lock_many_locks_the_existing_jobs_in_id_order(db: Database) -> None:
    ids = [await insert_job(db, job_id=f"job-{n}") for n in (3, 1, 2)]
    async with db.transaction() as conn:
        locked = await store_jobs.lock_many(conn, [*ids, "missing"])
        assert list(locked) == ["job-1", "job-2", "job-3"]
        async with db.transaction() as other:
            free = await other.fetch("SELECT id FROM jobs FOR UPDATE SKIP LOCKED")
        assert free == []
