"""The rules by which an orphan reaches a job: whether a planned match still holds under the
locks, and whether an operator's assignment or dismissal may be carried out.

Pure functions over what the store read under the locks: each answers why not (a sentence
for the decision record or the operator), or None when the change may be made.
"""

from __future__ import annotations

import dataclasses

from gateway.jobs.kinds import Kind
from gateway.jobs.records import LockedJob
from gateway.jobs.state import COMPLETABLE

# An orphan still waiting for its job, for the reconciler or an operator.
OPEN_STATES = ("unresolved", "unmatched")
# An orphan that reached a job.
RESOLVED_STATES = ("matched", "assigned")
ORPHAN_STATES = (*OPEN_STATES, *RESOLVED_STATES, "dismissed")


@dataclasses.dataclass(frozen=True, slots=True)
class MatchState:
    """An orphan and a job as they are now, read under both locks."""

    orphan_state: str
    alias_job_id: str | None
    job_has_other_alias: bool
    job_had_webhook: bool
    job_file_count: int


@dataclasses.dataclass(frozen=True, slots=True)
class LockedOrphan:
    """An orphan as read under its row lock."""

    kind: Kind
    backend_job_id: str
    state: str
    job_id: str | None
    user_id: str | None


def match_obstacle(
    rule: str, planned_job_id: str, job: LockedJob | None, state: MatchState | None
) -> str | None:
    """Why the planned match (by `rule`, to `planned_job_id`) no longer holds, or None when
    it does."""
    if job is None:
        return "the job no longer exists"
    if state is None:
        return "the orphan no longer exists"
    if rule == "alias":
        if state.orphan_state not in OPEN_STATES:
            return f"the orphan is {state.orphan_state} already"
        if state.alias_job_id != planned_job_id:
            return "the backend id is an alias of another job now"
        return None
    if state.orphan_state != "unresolved":
        return f"the orphan is {state.orphan_state} already"
    if state.alias_job_id is not None:
        return "the backend id got an alias meanwhile"
    if state.job_has_other_alias:
        return "the job got another backend id meanwhile"
    if state.job_had_webhook or job.first_webhook_at is not None:
        return "the job heard from the backend under its own id meanwhile"
    if job.state.status not in COMPLETABLE:
        return f"the job is {job.state.status.value} meanwhile"
    return None


def assign_obstacle(
    kind: Kind,
    backend_job_id: str,
    job_id: str,
    job: LockedJob | None,
    orphan: LockedOrphan | None,
    state: MatchState | None,
    *,
    allow_other_user: bool,
) -> str | None:
    """Why an operator may not give the orphan to the job, or None when they may."""
    if job is None:
        return f"no job has id {job_id!r}"
    if job.kind is not kind:
        return f"job {job_id} is a {job.kind.value} job and the orphan a {kind.value} one"
    if orphan is None:
        return f"no {kind.value} orphan has backend job id {backend_job_id!r}"
    if orphan.state in RESOLVED_STATES:
        return (f"the {kind.value} orphan {backend_job_id} is {orphan.state} already "
                f"(job {orphan.job_id})")
    hinted = orphan.user_id
    if hinted is not None and hinted != job.user_id and not allow_other_user:
        return (f"the orphan names user {hinted!r} but job {job_id} belongs to user "
                f"{job.user_id!r}; pass --allow-other-user if that is really meant")
    if state is None:  # cannot happen: the orphan's row is locked
        return f"the {kind.value} orphan {backend_job_id} disappeared"
    if state.alias_job_id not in (None, job_id):
        return f"backend job id {backend_job_id} is an alias of job {state.alias_job_id}"
    if state.job_has_other_alias:
        return f"job {job_id} already has another backend job id"
    if state.job_file_count:
        return (f"job {job_id} has {state.job_file_count} file(s) already "
                f"({job.state.status.value}): it is not waiting for these")
    return None


def dismiss_obstacle(kind: Kind, backend_job_id: str, orphan: LockedOrphan | None) -> str | None:
    """Why an operator may not close the orphan, or None when they may."""
    if orphan is None:
        return f"no {kind.value} orphan has backend job id {backend_job_id!r}"
    if orphan.state not in OPEN_STATES:
        return f"the {kind.value} orphan {backend_job_id} is {orphan.state} already"
    return None
