"""Every status x event pair, and convergence under any arrival order."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.jobs.state import Event, JobState, Outcome, Status, transition

S = Status
FORWARD = [S.PENDING, S.QUEUED, S.INITIALIZING, S.GENERATING, S.SAVING]
TERMINALS = [S.COMPLETED, S.FAILED, S.CANCELLED, S.TIMED_OUT]


def expected_outcome(current: Status, event: Status) -> Outcome:
    """The contract's rules, written as a table rather than as ranks (progress 40 -> 50)."""
    if current in TERMINALS:
        ok = current is S.TIMED_OUT and event is S.COMPLETED
        return Outcome.APPLIED if ok else Outcome.STALE
    if event in TERMINALS:
        return Outcome.APPLIED
    # the same status with more progress is a progress update
    same_or_later = FORWARD[FORWARD.index(current) :]
    return Outcome.APPLIED if event in same_or_later else Outcome.STALE


@pytest.mark.parametrize(
    ("current", "event"), list(itertools.product(list(Status), list(Status)))
)
def test_every_status_event_pair(current: Status, event: Status) -> None:
    step = transition(JobState(current, 40), Event(event, 50))
    assert step.outcome is expected_outcome(current, event)
    if step.applied:
        assert step.state.status is event
        assert step.state.progress >= 40
    else:
        assert step.state == JobState(current, 40)


def test_progress_within_a_status_only_grows() -> None:
    generating = JobState(S.GENERATING, 60)
    assert transition(generating, Event(S.GENERATING, 70)).state.progress == 70
    assert transition(generating, Event(S.GENERATING, 50)).outcome is Outcome.STALE
    assert transition(generating, Event(S.GENERATING, 60)).outcome is Outcome.STALE


def test_progress_never_decreases_on_a_forward_move() -> None:
    step = transition(JobState(S.GENERATING, 80), Event(S.SAVING, 10))
    assert step.state == JobState(S.SAVING, 80)


def test_completed_is_always_100() -> None:
    assert transition(JobState(S.QUEUED, 0), Event(S.COMPLETED, 7)).state.progress == 100
    assert transition(JobState(S.TIMED_OUT, 30), Event(S.COMPLETED)).state.progress == 100


def test_failure_keeps_the_progress_reached() -> None:
    assert transition(JobState(S.GENERATING, 60), Event(S.FAILED, 100)).state.progress == 60


def test_progress_out_of_range_is_clamped() -> None:
    assert transition(JobState(S.QUEUED, 0), Event(S.GENERATING, 250)).state.progress == 100


def test_webhook_words_map_to_statuses() -> None:
    assert Status.from_webhook("initializing") is S.INITIALIZING
    assert Status.from_webhook(" Completed ") is S.COMPLETED
    assert Status.from_webhook("exploded") is None


SEQUENCES = {
    "completed": [
        Event(S.INITIALIZING, 25),
        Event(S.GENERATING, 60),
        Event(S.SAVING, 90),
        Event(S.COMPLETED, 100),
    ],
    "failed": [Event(S.INITIALIZING, 25), Event(S.GENERATING, 60), Event(S.FAILED)],
}


def run(events: list[Event]) -> JobState:
    state = JobState(S.QUEUED, 0)
    for event in events:
        state = transition(state, event).state
    return state


@pytest.mark.parametrize("name", list(SEQUENCES))
@given(data=st.data())
def test_any_arrival_order_converges(name: str, data: st.DataObject) -> None:
    events = SEQUENCES[name]
    in_order = run(events)
    shuffled = data.draw(st.permutations(events))
    repeated = data.draw(st.lists(st.sampled_from(events), max_size=6))
    final = run(list(shuffled) + repeated)
    assert final.status is in_order.status
    if final.status is S.COMPLETED:
        assert final == in_order
    else:
        # a failure freezes the progress reached when it arrived: never more than in order
        assert final.progress <= in_order.progress
