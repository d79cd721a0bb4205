"""The records the state machine and the rules work on: a job, an update, a file.

Plain values: the store reads and writes them, the webhook payload and the use cases make
them, and nothing here knows where they came from.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

from gateway.jobs.kinds import Kind
from gateway.jobs.state import Event, JobState


@dataclasses.dataclass(frozen=True, slots=True)
class LockedJob:
    """A job as read under its row lock: what the state machine and the rules need of it."""

    id: str
    kind: Kind
    user_id: str
    state: JobState
    seq: int
    created_at: dt.datetime
    first_webhook_at: dt.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class FileRecord:
    url: str
    storage_key: str | None = None
    filename: str | None = None
    format: str | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    duration_seconds: float | None = None
    description: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class JobUpdate:
    """An event plus what it carries, as the state machine and the store need it."""

    event: Event
    source: str
    message: str | None = None
    error_message: str | None = None
    files: Sequence[FileRecord] = ()
    model_name: str | None = None
    generation_time_seconds: float | None = None
    from_webhook: bool = False
