"""Take over the existing app's database: every legacy generation becomes a job of its
author (same id), or, when the old webhook made it on the first user, an orphan under its
backend id for the reconciler to give back; notifications follow their users.

Keyed on legacy ids: importing again adds only what is new, and a legacy row that changed
since (a late completion) moves its job forward through the state machine, never back.
Imported jobs never reach the outbox: the backend has long had them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import structlog

from gateway.errors import GatewayError
from gateway.jobs import legacy
from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.jobs.records import FileRecord, JobUpdate
from gateway.jobs.state import Event, Status
from gateway.store import jobs as store_jobs
from gateway.store import legacy as store_legacy
from gateway.store import legacy_source as source
from gateway.store.database import Database, commit_without_flush, rowcount

log = structlog.get_logger(__name__)

SOURCE = "legacy_import"
# Whether a job row changed since its import: the legacy row's updatedAt moved on.
Progress = Callable[[str, int], None]


class SourceError(GatewayError):
    """The legacy database cannot be read: unreachable, or not the expected schema."""


@dataclasses.dataclass(slots=True)
class KindCounts:
    jobs: int = 0
    files: int = 0
    misattributed: int = 0
    updated: int = 0
    already_imported: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SkippedRow:
    table: str
    id: str
    reason: str


@dataclasses.dataclass(slots=True)
class ImportReport:
    dry_run: bool
    kinds: dict[Kind, KindCounts] = dataclasses.field(
        default_factory=lambda: {k: KindCounts() for k in Kind})
    notifications: int = 0
    notifications_withheld: int = 0
    skipped: list[SkippedRow] = dataclasses.field(default_factory=list)
    misattributed_ids: set[str] = dataclasses.field(default_factory=set)
    repairs: list[Repair] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class Repair:
    """A misattributed row as the reconciler left it: given back or left for review."""

    kind: str
    backend_job_id: str
    taken_from: str | None
    state: str
    job_id: str | None
    given_to: str | None
    reason: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    """One legacy generation, decided."""

    record: asyncpg.Record
    status: Status
    files: tuple[FileRecord, ...]


async def import_legacy(url: str, db: Database, *, dry_run: bool = False,
                        batch_size: int = 5000,
                        progress: Progress | None = None) -> ImportReport:
    try:
        conn = await source.open_source(url)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise SourceError(f"the legacy database cannot be reached: {error}") from error
    try:
        missing = await source.missing_columns(conn)
        if missing:
            raise SourceError("the legacy database is not the existing app's schema; "
                              "missing: " + ", ".join(missing))
        report = ImportReport(dry_run=dry_run)
        # reading the next batch overlaps writing this one; two batches in flight at most
        queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=2)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_write_batches(db, queue, report, progress))
                tasks.create_task(_read_batches(conn, queue, batch_size))
        except ExceptionGroup as failed:  # the first failure; the other task was cancelled
            raise failed.exceptions[0] from None
        async with db.connection() as target:
            report.repairs = [Repair(r["kind"], r["legacy_id"], r["author_id"], r["state"],
                                     r["job_id"], r["user_id"], r["reason"])
                              for r in await store_legacy.repairs(target)]
        log.info("legacy_import_done", dry_run=dry_run, skipped=len(report.skipped),
                 **{f"{k.value}_jobs": c.jobs for k, c in report.kinds.items()})
        return report
    finally:
        await conn.close()


@dataclasses.dataclass(frozen=True, slots=True)
class _Batch:
    kind: Kind | None  # None: notifications
    rows: list[asyncpg.Record]
    files: dict[str, list[asyncpg.Record]]
    first_user: str | None
    backend_direct: set[str]


async def _read_batches(conn: asyncpg.Connection, queue: asyncio.Queue[_Batch | None],
                        batch_size: int) -> None:
    """The source in one read-only snapshot, generations (with their files) before the
    notifications that name them."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        first = await source.first_user(conn)
        direct = await source.backend_direct_ids(conn)
        for kind in Kind:
            async for rows in source.batches(conn, source.generations_query(kind), batch_size):
                files = await source.files_of(conn, kind, [r["id"] for r in rows])
                await queue.put(_Batch(kind, rows, files, first, direct))
        async for rows in source.batches(conn, source.NOTIFICATIONS_QUERY, batch_size):
            await queue.put(_Batch(None, rows, {}, first, direct))
    await queue.put(None)


async def _write_batches(db: Database, queue: asyncio.Queue[_Batch | None],
                         report: ImportReport, progress: Progress | None) -> None:
    while (batch := await queue.get()) is not None:
        if batch.kind is None:
            await _notifications(db, batch.rows, report)
            table = "notifications"
        else:
            await _generations(db, batch.kind, batch.rows, batch.files, batch.first_user,
                               batch.backend_direct, report)
            table = legacy.TABLES[batch.kind][0]
        if progress:
            progress(table, len(batch.rows))


def _decide(kind: Kind, r: asyncpg.Record, files: Sequence[asyncpg.Record],
            report: ImportReport) -> _Row | None:
    table, file_table = legacy.TABLES[kind]
    if r["clerkId"] is None:
        report.skipped.append(SkippedRow(table, r["id"], f"author {r['authorId']} not found"))
        return None
    status = legacy.status_of(r["status"])
    if status is None:
        report.skipped.append(SkippedRow(table, r["id"], f"status {r['status']!r} unknown"))
        return None
    records: list[FileRecord] = []
    for f in files:
        made = legacy.file_record(kind, f)
        if isinstance(made, str):
            report.skipped.append(SkippedRow(file_table, f["id"], made))
        else:
            records.append(made)
    return _Row(r, status, tuple(records))


async def _generations(db: Database, kind: Kind, rows: Sequence[asyncpg.Record],
                       files: dict[str, list[asyncpg.Record]], first: str | None,
                       direct: set[str], report: ImportReport) -> None:
    counts = report.kinds[kind]
    decided = [d for r in rows if (d := _decide(kind, r, files.get(r["id"], []), report))]
    async with db.connection() as conn, conn.transaction():
        # a crash loses at most the last batches, which the next import writes again
        await commit_without_flush(conn)
        known = await store_legacy.known(conn, kind, [d.record["id"] for d in decided])
        jobs: list[_Row] = []
        orphans: list[_Row] = []
        changed: list[_Row] = []
        for d in decided:
            r = d.record
            first_file = files.get(r["id"], [None])[0]
            description = (first_file["metadata"] or {}).get("description") \
                if first_file is not None and isinstance(first_file["metadata"], dict) else None
            evidence = legacy.Evidence(
                on_first_user=r["authorId"] == first,
                backend_direct_notification=r["id"] in direct,
                prompt_is_description=description is not None and description == r["prompt"],
                prompt_is_placeholder=r["prompt"] == legacy.PLACEHOLDER_PROMPT,
            )
            is_orphan = legacy.misattributed(r["id"], evidence)
            if is_orphan:
                report.misattributed_ids.add(r["id"])
            seen = known.get(r["id"])
            if seen is None:
                (orphans if is_orphan else jobs).append(d)
            elif seen["target"] == "job" and r["updatedAt"] > seen["updated_at"]:
                changed.append(d)
            else:
                counts.already_imported += 1
        counts.misattributed += sum(1 for d in orphans)
        if report.dry_run:
            counts.jobs += len(jobs)
            counts.files += sum(len(d.files) for d in jobs)
            counts.updated += len(changed)
            return
        counts.jobs += await _write_jobs(conn, kind, jobs)
        counts.files += await _write_files(conn, jobs)
        await _write_orphans(conn, kind, orphans)
        for d in changed:
            counts.updated += await _advance(conn, kind, d)
        await store_legacy.write(conn, store_legacy.RECORD_IMPORTED, [
            (kind.value, d.record["id"], "orphan" if d in orphans else "job",
             d.record["updatedAt"], d.record["clerkId"])
            for d in (*jobs, *orphans, *changed)], 5)


async def _write_jobs(conn: asyncpg.Connection, kind: Kind, jobs: Sequence[_Row]) -> int:
    if not jobs:
        return 0
    rows = []
    for d in jobs:
        r = d.record
        finished = (r["completedAt"] or r["updatedAt"]) if d.status.terminal else None
        rows.append((r["id"], kind.value, r["clerkId"], r["organizationId"], r["prompt"],
                     normalize(r["prompt"]), legacy.params_of(kind, r), d.status.value,
                     max(0, min(100, r["progress"])), r["message"], r["errorMessage"],
                     r["model"], r["processingTime"], r["createdAt"], r["updatedAt"],
                     finished))
    done = rowcount(await conn.execute(store_legacy.INSERT_JOBS, *store_legacy.columns(rows, 16)))
    await store_legacy.write(conn, store_legacy.INSERT_JOB_EVENTS, [
        (r[0], r[7], r[8], r[9], r[14]) for r in rows], 5)
    return done


def _file_rows(job_id: str, files: Sequence[FileRecord], at: Any) -> list[tuple[Any, ...]]:
    return [(job_id, i, f.url, f.storage_key, f.filename, f.format, f.size_bytes, f.width,
             f.height, f.duration_seconds, f.description, at) for i, f in enumerate(files)]


async def _write_files(conn: asyncpg.Connection, jobs: Sequence[_Row]) -> int:
    rows = [row for d in jobs
            for row in _file_rows(d.record["id"], d.files,
                                  d.record["completedAt"] or d.record["updatedAt"])]
    if not rows:
        return 0
    return rowcount(await conn.execute(store_legacy.INSERT_FILES, *store_legacy.columns(rows, 12)))


async def _write_orphans(conn: asyncpg.Connection, kind: Kind, orphans: Sequence[_Row]) -> None:
    """Each misattributed row as the completed webhook the backend sent: its prompt a hint
    (not the placeholder), no user (the first user is not evidence of anything)."""
    hinted = [None if d.record["prompt"] == legacy.PLACEHOLDER_PROMPT else d.record["prompt"]
              for d in orphans]
    await store_legacy.write(conn, store_legacy.INSERT_ORPHANS, [
        (kind.value, d.record["id"], p, normalize(p) if p else None, len(d.files),
         d.record["createdAt"]) for d, p in zip(orphans, hinted, strict=True)], 6)
    await store_legacy.write(conn, store_legacy.INSERT_ORPHAN_EVENTS, [
        (kind.value, d.record["id"], legacy.orphan_payload(kind, d.record, d.files),
         d.record["createdAt"]) for d in orphans], 4)


async def _advance(conn: asyncpg.Connection, kind: Kind, d: _Row) -> int:
    """A legacy row that changed since its import moves its job forward; 1 when it did."""
    job = await store_jobs.lock(conn, d.record["id"])
    if job is None or job.kind is not kind:
        return 0
    r = d.record
    update = JobUpdate(event=Event(d.status, r["progress"]), source=SOURCE,
                       message=r["message"], error_message=r["errorMessage"], files=d.files,
                       model_name=r["model"], generation_time_seconds=r["processingTime"])
    applied = await store_jobs.apply(conn, job, update)
    return 1 if applied.transition.applied else 0


async def _notifications(db: Database, rows: Sequence[asyncpg.Record],
                         report: ImportReport) -> None:
    keep = []
    for n in rows:
        metadata = n["metadata"] if isinstance(n["metadata"], dict) else {}
        generation = metadata.get("generationId")
        if n["clerkId"] is None:
            report.skipped.append(SkippedRow("notifications", n["id"],
                                             f"user {n['userId']} not found"))
        elif (metadata.get("source") == legacy.BACKEND_DIRECT
              and generation in report.misattributed_ids):
            report.notifications_withheld += 1  # it told the first user of someone's image
        else:
            keep.append((n["id"], n["clerkId"],
                         generation if isinstance(generation, str) else None, n["type"],
                         n["title"], n["message"], {**metadata, "legacy_id": n["id"]},
                         n["read"], n["createdAt"]))
    if report.dry_run:
        async with db.connection() as conn:
            have = await store_legacy.notifications_known(conn, [k[0] for k in keep])
        report.notifications += len(keep) - have
        return
    if keep:
        async with db.connection() as conn:
            report.notifications += rowcount(await conn.execute(
                store_legacy.INSERT_NOTIFICATIONS, *store_legacy.columns(keep, 9)))
