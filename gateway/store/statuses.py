"""The state machine's status sets as SQL, rendered once from `gateway.jobs.state`.

Rendered rather than bound: a partial index is used only when the planner can see that the
statement's condition implies the index's predicate, which a parameter hides. The sets are
rendered in the enum's order, the order the migrations' index predicates were written in.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.jobs.state import ACTIVE, COMPLETABLE, TERMINAL, Status


def literal(status: Status) -> str:
    """One status as an SQL literal."""
    return f"'{status.value}'"


def sql_list(statuses: Iterable[Status]) -> str:
    """A set of statuses as an SQL list, `('A', 'B')`, in the enum's order."""
    chosen = frozenset(statuses)
    return "(" + ", ".join(literal(s) for s in Status if s in chosen) + ")"


# `status NOT IN TERMINAL_LIST`: the active jobs (the partial indexes jobs_active_updated
# and jobs_active_status, jobs_user_active)
TERMINAL_LIST = sql_list(TERMINAL)
# `status NOT IN UNCOMPLETABLE_LIST`: the jobs a completion still applies to (jobs_candidates)
UNCOMPLETABLE_LIST = sql_list(frozenset(Status) - COMPLETABLE)

# Which partial index on jobs names which set of statuses, and what it names them by:
# checked against the migrated schema by the tests.
INDEX_STATUS_SETS: dict[str, frozenset[Status]] = {
    "jobs_active_updated": ACTIVE,
    "jobs_active_status": ACTIVE,
    "jobs_candidates": COMPLETABLE,
    "jobs_user_active": ACTIVE,
}
