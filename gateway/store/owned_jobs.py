"""Jobs as their owner makes and sees them: create (with the first delivery), read one, a
gallery page, and lock one for a cancel. Another user's job is exactly as absent as none."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.jobs.kinds import Kind
from gateway.jobs.limits import WINDOW, Limits, Usage
from gateway.jobs.prompts import normalize
from gateway.jobs.records import FileRecord, LockedJob
from gateway.jobs.state import Status
from gateway.store.jobs import JOB_COLUMNS, locked_job


@dataclasses.dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    kind: Kind
    user_id: str
    org_id: str | None
    prompt: str
    params: dict[str, Any]
    message: str
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    """The job a create request stands for: new, or the one an earlier request with the same
    Idempotency-Key made (`inserted` False; `same_request` says whether the bodies match)."""

    id: str
    status: Status
    message: str | None
    created_at: dt.datetime
    inserted: bool
    same_request: bool = True


# One call (sorami_create_job_v1, migration 0012): under the user's lock for the kind when a
# limit applies, the Idempotency-Key's earlier job or the usage and, unless a limit refuses,
# the job with its first outbox row (due now, or waiting for admission) and the
# dispatcher's wake-up. The unique index jobs_idempotency decides between concurrent
# creates with one key that take no lock: the loser inserts nothing and reads the winner's.
CREATE_JOB = """
SELECT * FROM sorami_create_job_v1($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                                   $14, $15, $16)
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Creation:
    """What a create did: `created` is the new job or the key's earlier one (None when a
    limit refused it, nothing written); `limits` and `usage` are what it was checked
    against, read at `read_at` (`usage` None when both limits are off)."""

    created: Created | None
    limits: Limits
    usage: Usage | None
    read_at: dt.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class CreateRequest:
    """One create: the job, the payload of its generate call to the backend, the limits that
    apply unless the user has an override, and whether the call waits for admission."""

    new: NewJob
    payload: dict[str, Any]
    limits: Limits
    wait_for_admission: bool = False


async def create(conn: asyncpg.Connection, request: CreateRequest) -> Creation:
    """Create a job with its outbox row in one call (its own transaction, or the caller's)
    unless its limits (or the user's override of them) refuse it; or find the job its
    Idempotency-Key already made, which no limit refuses."""
    row = await conn.fetchrow(CREATE_JOB, *_create_args(request))
    assert row is not None
    return _creation(row, request.new)


async def create_many(
    conn: asyncpg.Connection, requests: Sequence[CreateRequest]
) -> list[Creation]:
    """The creates in the order given, each as `create` makes it, in one transaction and one
    round trip (the calls pipelined; a repeated Idempotency-Key finds the job the first
    made)."""
    rows = await conn.fetchmany(CREATE_JOB, [_create_args(r) for r in requests])
    # the function returns one row per call
    assert len(rows) == len(requests)
    return [_creation(row, r.new) for row, r in zip(rows, requests, strict=True)]


def _create_args(request: CreateRequest) -> tuple[Any, ...]:
    new, limits = request.new, request.limits
    # the job's first outbox row is its generate call
    return (new.id, new.kind.value, new.user_id, new.org_id, new.prompt, normalize(new.prompt),
            new.params, new.message, new.idempotency_key, new.request_hash, "generate",
            request.payload, request.wait_for_admission, limits.active, limits.per_hour, WINDOW)


def _creation(row: asyncpg.Record, new: NewJob) -> Creation:
    in_force = Limits(row["max_active"], row["per_hour"])
    usage = None
    if row["read_at"] is not None:
        usage = Usage(row["active"] or 0, row["in_window"] or 0, row["oldest_leaves_at"],
                      row["frees_at"])
    created = None
    if row["outcome"] != "refused":
        inserted = row["outcome"] == "created"
        created = Created(
            row["id"], Status(row["status"]), row["message"], row["created_at"], inserted,
            same_request=inserted or row["request_hash"] == new.request_hash,
        )
    return Creation(created, in_force, usage, row["read_at"])


@dataclasses.dataclass(frozen=True, slots=True)
class JobView:
    """A job as its owner sees it."""

    id: str
    kind: Kind
    status: Status
    progress: int
    message: str | None
    error_message: str | None
    prompt: str
    params: dict[str, Any]
    model_name: str | None
    generation_time_seconds: float | None
    seq: int
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    files: tuple[FileRecord, ...] = ()

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> JobView:
        files = r.get("files")
        return cls(
            id=r["id"],
            kind=Kind(r["kind"]),
            status=Status(r["status"]),
            progress=r["progress"],
            message=r["message"],
            error_message=r["error_message"],
            prompt=r["prompt"],
            params=r["params"],
            model_name=r["model_name"],
            generation_time_seconds=r["generation_time_seconds"],
            seq=r["seq"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            finished_at=r["finished_at"],
            files=tuple(FileRecord(**f) for f in files or ()),
        )


_VIEW_COLUMNS = """
j.id, j.kind, j.status, j.progress, j.message, j.error_message, j.prompt, j.params,
j.model_name, j.generation_time_seconds, j.seq, j.created_at, j.updated_at, j.finished_at
"""

_FILES_LATERAL = """
LEFT JOIN LATERAL (
    SELECT jsonb_agg(jsonb_build_object(
               'url', f.url, 'storage_key', f.storage_key, 'filename', f.filename,
               'format', f.format, 'size_bytes', f.size_bytes, 'width', f.width,
               'height', f.height, 'duration_seconds', f.duration_seconds,
               'description', f.description) ORDER BY f.position) AS files
    FROM job_files f WHERE f.job_id = j.id
) files ON true
"""

# Owner and kind in the WHERE clause: another user's job is exactly as absent as none.
OWNED_JOB = f"""
SELECT {_VIEW_COLUMNS} FROM jobs j
WHERE j.id = $1 AND j.user_id = $2 AND j.kind = $3
"""

OWNED_JOB_WITH_FILES = f"""
SELECT {_VIEW_COLUMNS}, files.files FROM jobs j
{_FILES_LATERAL}
WHERE j.id = $1 AND j.user_id = $2 AND j.kind = $3
"""

OWNED_JOB_ANY_KIND = f"""
SELECT {_VIEW_COLUMNS} FROM jobs j
WHERE j.id = $1 AND j.user_id = $2
"""


async def get_owned(
    conn: asyncpg.Connection,
    job_id: str,
    user_id: str,
    kind: Kind | None,
    *,
    with_files: bool = False,
) -> JobView | None:
    """The job if `user_id` owns it (and it is of `kind`, when given); else None."""
    if kind is None:
        row = await conn.fetchrow(OWNED_JOB_ANY_KIND, job_id, user_id)
    else:
        query = OWNED_JOB_WITH_FILES if with_files else OWNED_JOB
        row = await conn.fetchrow(query, job_id, user_id, kind.value)
    return JobView.from_record(row) if row else None


# Newest first, keyset on (created_at, id): rows inserted meanwhile never shift a page.
GALLERY_FIRST_PAGE = f"""
SELECT {_VIEW_COLUMNS}, files.files FROM jobs j
{_FILES_LATERAL}
WHERE j.user_id = $1 AND j.kind = $2
ORDER BY j.created_at DESC, j.id DESC
LIMIT $3
"""

GALLERY_NEXT_PAGE = f"""
SELECT {_VIEW_COLUMNS}, files.files FROM jobs j
{_FILES_LATERAL}
WHERE j.user_id = $1 AND j.kind = $2 AND (j.created_at, j.id) < ($4, $5)
ORDER BY j.created_at DESC, j.id DESC
LIMIT $3
"""


async def gallery(
    conn: asyncpg.Connection,
    user_id: str,
    kind: Kind,
    *,
    limit: int,
    after: tuple[dt.datetime, str] | None = None,
) -> list[JobView]:
    """One page of a user's jobs of one kind, files included, after the (created_at, id) given."""
    if after is None:
        rows = await conn.fetch(GALLERY_FIRST_PAGE, user_id, kind.value, limit)
    else:
        rows = await conn.fetch(GALLERY_NEXT_PAGE, user_id, kind.value, limit, *after)
    return [JobView.from_record(r) for r in rows]


LOCK_OWNED = f"""
SELECT {JOB_COLUMNS} FROM jobs j
WHERE j.id = $1 AND j.user_id = $2 AND j.kind = $3
FOR UPDATE
"""


async def lock_owned(
    conn: asyncpg.Connection, job_id: str, user_id: str, kind: Kind
) -> LockedJob | None:
    """Lock a job of `kind` that `user_id` owns (cancel); None for anyone else's."""
    row = await conn.fetchrow(LOCK_OWNED, job_id, user_id, kind.value)
    return locked_job(row) if row else None
