"""The job state machine: pure, shared by the receiver, delivery, cancel and the reconciler.

Jobs only move forward; progress never decreases; terminal statuses are final, except that
a completion for a TIMED_OUT job completes it (the user still gets the files).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final


class Status(enum.StrEnum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    INITIALIZING = "INITIALIZING"
    GENERATING = "GENERATING"
    SAVING = "SAVING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @classmethod
    def from_webhook(cls, word: str) -> Status | None:
        """The backend's lowercase status word -> a Status (None when unknown)."""
        try:
            return cls(word.strip().upper())
        except ValueError:
            return None


TERMINAL: Final = frozenset(
    {Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT}
)

# Position along the one forward path; every terminal status sits at the end.
_RANK: Final = {
    Status.PENDING: 0,
    Status.QUEUED: 1,
    Status.INITIALIZING: 2,
    Status.GENERATING: 3,
    Status.SAVING: 4,
    Status.COMPLETED: 5,
    Status.FAILED: 5,
    Status.CANCELLED: 5,
    Status.TIMED_OUT: 5,
}

# Progress a status implies when the event carries none.
_FLOOR: Final = {
    Status.PENDING: 0,
    Status.QUEUED: 0,
    Status.INITIALIZING: 0,
    Status.GENERATING: 0,
    Status.SAVING: 0,
    Status.COMPLETED: 100,
}


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    STALE = "stale"


@dataclasses.dataclass(frozen=True, slots=True)
class JobState:
    status: Status
    progress: int


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a job: a webhook, an answer from the backend, a cancel."""

    status: Status
    progress: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    outcome: Outcome
    state: JobState

    @property
    def applied(self) -> bool:
        return self.outcome is Outcome.APPLIED

    @property
    def finished(self) -> bool:
        """True when this transition makes the job terminal (notify, store files)."""
        return self.applied and self.state.status.terminal


def transition(current: JobState, event: Event) -> Transition:
    """Where `event` takes a job in `current`; STALE leaves it where it is."""
    stale = Transition(Outcome.STALE, current)
    if current.status.terminal:
        if current.status is Status.TIMED_OUT and event.status is Status.COMPLETED:
            return Transition(Outcome.APPLIED, JobState(Status.COMPLETED, 100))
        return stale

    rank, new_rank = _RANK[current.status], _RANK[event.status]
    if new_rank < rank:
        return stale

    progress = _clamp(event.progress if event.progress is not None else 0)
    if event.status is Status.COMPLETED:
        progress = 100
    progress = max(progress, current.progress, _FLOOR.get(event.status, 0))
    if event.status.terminal and event.status is not Status.COMPLETED:
        # a failed/cancelled/timed-out job keeps the progress it had reached
        progress = current.progress

    if new_rank == rank and progress <= current.progress:
        return stale  # same status, nothing new
    return Transition(Outcome.APPLIED, JobState(event.status, progress))


def _clamp(progress: int) -> int:
    return min(100, max(0, progress))
