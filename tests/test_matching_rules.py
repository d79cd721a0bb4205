"""The matching rules, pure: whether a planned match, an assignment or a dismissal holds."""

from __future__ import annotations

import datetime as dt

from gateway.jobs.kinds import Kind
from gateway.jobs.matching import (
    LockedOrphan,
    MatchState,
    assign_obstacle,
    dismiss_obstacle,
    match_obstacle,
)
from gateway.jobs.records import LockedJob
from gateway.jobs.state import JobState, Status

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def job(status: Status = Status.QUEUED, *, heard: bool = False, kind: Kind = Kind.IMAGE,
        user_id: str = "u1") -> LockedJob:
    return LockedJob("job-1", kind, user_id, JobState(status, 0), 1, NOW,
                     NOW if heard else None)


def state(orphan_state: str = "unresolved", *, alias: str | None = None,
          other_alias: bool = False, webhook: bool = False, files: int = 0) -> MatchState:
    return MatchState(orphan_state, alias, other_alias, webhook, files)


def orphan(orphan_state: str = "unresolved", user_id: str | None = "u1") -> LockedOrphan:
    return LockedOrphan(Kind.IMAGE, "b-1", orphan_state, None, user_id)


def test_a_prompt_match_holds_for_a_job_a_completion_still_applies_to() -> None:
    for status in (Status.PENDING, Status.SAVING, Status.TIMED_OUT):
        assert match_obstacle("user_prompt", "job-1", job(status), state()) is None


def test_a_prompt_match_to_a_finished_job_is_withdrawn() -> None:
    for status in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
        assert match_obstacle("user_prompt", "job-1", job(status), state()) == (
            f"the job is {status.value} meanwhile")


def test_a_prompt_match_is_withdrawn_once_the_job_heard_from_the_backend() -> None:
    assert match_obstacle("user_prompt", "job-1", job(heard=True), state()) is not None
    assert match_obstacle("user_prompt", "job-1", job(), state(webhook=True)) is not None


def test_an_alias_match_holds_while_the_orphan_is_open_and_the_alias_is_the_jobs() -> None:
    assert match_obstacle("alias", "job-1", job(), state("unmatched", alias="job-1")) is None
    assert match_obstacle("alias", "job-1", job(), state("unmatched", alias="job-2")) == (
        "the backend id is an alias of another job now")
    assert match_obstacle("alias", "job-1", job(), state("matched", alias="job-1")) == (
        "the orphan is matched already")


def test_a_match_without_job_or_orphan_is_withdrawn() -> None:
    assert match_obstacle("alias", "job-1", None, state()) == "the job no longer exists"
    assert match_obstacle("alias", "job-1", job(), None) == "the orphan no longer exists"


def test_an_assignment_to_another_users_job_needs_the_flag() -> None:
    other = job(user_id="u2")
    assert "allow-other-user" in (assign_obstacle(
        Kind.IMAGE, "b-1", "job-1", other, orphan(), state(), allow_other_user=False) or "")
    assert assign_obstacle(Kind.IMAGE, "b-1", "job-1", other, orphan(), state(),
                           allow_other_user=True) is None


def test_an_assignment_is_refused_for_a_wrong_kind_a_resolved_orphan_or_a_taken_alias() -> None:
    assert assign_obstacle(Kind.IMAGE, "b-1", "job-1", job(kind=Kind.VIDEO), None, None,
                           allow_other_user=False) == (
        "job job-1 is a video job and the orphan a image one")
    assert assign_obstacle(Kind.IMAGE, "b-1", "job-1", job(), orphan("assigned"), state(),
                           allow_other_user=False) == (
        "the image orphan b-1 is assigned already (job None)")
    assert assign_obstacle(Kind.IMAGE, "b-1", "job-1", job(), orphan(), state(alias="job-9"),
                           allow_other_user=False) == (
        "backend job id b-1 is an alias of job job-9")


def test_an_operator_cannot_give_files_to_a_job_that_has_its_own() -> None:
    completed = job(Status.COMPLETED)
    assert assign_obstacle(Kind.IMAGE, "b-1", "job-1", completed, orphan(), state(files=2),
                           allow_other_user=False) == (
        "job job-1 has 2 file(s) already (COMPLETED): it is not waiting for these")
    # a job still waiting, or timed out without files, may still be given the orphan's
    for status in (Status.PENDING, Status.TIMED_OUT):
        assert assign_obstacle(Kind.IMAGE, "b-1", "job-1", job(status), orphan(), state(),
                               allow_other_user=False) is None


def test_only_an_open_orphan_can_be_dismissed() -> None:
    assert dismiss_obstacle(Kind.IMAGE, "b-1", orphan("unmatched")) is None
    assert dismiss_obstacle(Kind.IMAGE, "b-1", orphan("dismissed")) == (
        "the image orphan b-1 is dismissed already")
    assert dismiss_obstacle(Kind.IMAGE, "b-1", None) == (
        "no image orphan has backend job id 'b-1'")
