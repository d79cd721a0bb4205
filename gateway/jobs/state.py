"""The job state machine: pure, shared by the receiver, delivery, cancel and the reconciler.

Jobs only move forward; progress never decreases; terminal statuses are final, except that
a completion for a TIMED_OUT job completes it (the user still gets the files).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
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
# Statuses a job still changes from: timeouts, the metrics' active jobs, delivery.
ACTIVE: Final = frozenset(s for s in Status if s not in TERMINAL)

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


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What one event does to a job, for every state the job may be found in.

    An applied event always takes the job to `status` with progress max(`progress`, the
    job's progress). It applies when the job's status is in `always`, or in `if_advances`
    and the job's progress is below `progress`; otherwise it is stale. `transition` decides
    through the plan, and the webhook receiver hands the same plan to its statement, which
    decides under the job's row lock (gateway.store.webhooks): one set of rules, evaluated in
    Python or, for a job not read beforehand, in SQL.
    """

    status: Status
    progress: int
    always: frozenset[Status]
    if_advances: frozenset[Status]

    @property
    def finishes(self) -> bool:
        """True when applying the event makes the job terminal."""
        return self.status.terminal

    def applies(self, current: JobState) -> bool:
        return current.status in self.always or (
            current.status in self.if_advances and current.progress < self.progress
        )

    def apply(self, current: JobState) -> Transition:
        if not self.applies(current):
            return Transition(Outcome.STALE, current)
        return Transition(
            Outcome.APPLIED, JobState(self.status, max(self.progress, current.progress))
        )


@functools.lru_cache(maxsize=1024)
def plan(event: Event) -> Plan:
    """The event's plan. Jobs only move forward: from a later status the event is stale; to
    a later status it applies; within the same status it applies when it adds progress. A
    terminal job takes nothing, except a completion of a TIMED_OUT job."""
    status = event.status
    if status is Status.COMPLETED:
        progress = 100
    elif status.terminal:
        progress = 0  # a failed/cancelled/timed-out job keeps the progress it had reached
    else:
        progress = _clamp(event.progress or 0)
    rank = _RANK[status]
    always = {s for s in Status if not s.terminal and _RANK[s] < rank}
    if status is Status.COMPLETED:
        always.add(Status.TIMED_OUT)
    same = set() if status.terminal else {status}
    return Plan(status, progress, frozenset(always), frozenset(same))


# Statuses a completion still applies to: the jobs an orphan's files may complete.
COMPLETABLE: Final = plan(Event(Status.COMPLETED)).always


def transition(current: JobState, event: Event) -> Transition:
    """Where `event` takes a job in `current`; STALE leaves it where it is."""
    return plan(event).apply(current)


def _clamp(progress: int) -> int:
    return min(100, max(0, progress))
