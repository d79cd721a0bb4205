"""What operators do by hand: list orphans, assign one to a job, dismiss one.

An assignment goes through the same `orphans.attach` as an automatic match (alias, events
replayed through the state machine, one notification) and, like every decision, leaves a
`reconcile_decisions` row, with the actor ("operator" from the command line, the operator's
user id from the review console) and the operator's reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError
from gateway.jobs.kinds import Kind
from gateway.jobs.matching import OPEN_STATES, ORPHAN_STATES, assign_obstacle, dismiss_obstacle
from gateway.store import jobs as store_jobs
from gateway.store import orphans
from gateway.store.database import Database, translate_errors
from gateway.store.reconcile import apply as store_matches
from gateway.store.reconcile import operators as orphan_admin

if TYPE_CHECKING:
    import asyncpg

STATUS_CHOICES = ("open", "unresolved", "unmatched", "matched", "assigned", "dismissed", "all")
_STATES = {
    "open": OPEN_STATES,
    "all": ORPHAN_STATES,
}


class OperatorError(GatewayError):
    """The operator's request cannot be carried out; nothing was changed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Assigned:
    kind: Kind
    backend_job_id: str
    job_id: str
    user_id: str
    replayed: int
    job_status: str
    decision_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Dismissed:
    kind: Kind
    backend_job_id: str
    previous_state: str
    decision_id: int


def states_for(status: str) -> tuple[str, ...]:
    return _STATES.get(status, (status,))


async def list_orphans(db: Database, status: str) -> AsyncIterator[dict[str, Any]]:
    """Orphans with `status` and their latest decision, oldest first, streamed."""
    async with db.transaction() as conn:
        async for row in orphan_admin.list_orphans(conn, states_for(status)):
            yield dict(row.items())


async def assign(
    db: Database,
    backend_job_id: str,
    job_id: str,
    *,
    reason: str,
    kind: Kind | None = None,
    allow_other_user: bool = False,
    actor: str = "operator",
) -> Assigned:
    """Attach an orphan to a job chosen by an operator, and record why."""
    async with db.transaction() as conn:
        with translate_errors():
            kind = kind or await _infer_kind(conn, backend_job_id)
            job = await store_jobs.lock(conn, job_id)
            orphan = (await orphan_admin.lock_orphan(conn, kind, backend_job_id)
                      if job is not None and job.kind is kind else None)
            state = await store_matches.match_state(conn, kind, backend_job_id, job_id)
            obstacle = assign_obstacle(kind, backend_job_id, job_id, job, orphan, state,
                                       allow_other_user=allow_other_user)
            if obstacle is not None:
                raise OperatorError(obstacle)
            assert job is not None
            assert orphan is not None
            attached = await orphans.attach(conn, kind, backend_job_id, job, source="operator")
            status = attached.job.state.status.value
            decision_id = await orphan_admin.record_decision(
                conn,
                kind=kind,
                backend_job_id=backend_job_id,
                job_id=job_id,
                rule="operator",
                outcome="assigned",
                evidence={
                    "user_id": orphan.user_id,
                    "job_user_id": job.user_id,
                    "state_before": orphan.state,
                    "replayed_events": len(attached.transitions),
                    "job_status": status,
                },
                actor=actor,
                reason=reason,
            )
    return Assigned(kind, backend_job_id, job_id, job.user_id, len(attached.transitions),
                    status, decision_id)


async def dismiss(
    db: Database, backend_job_id: str, *, reason: str, kind: Kind | None = None,
    actor: str = "operator",
) -> Dismissed:
    """Close an orphan that belongs to no job (its events stay stored), and record why."""
    async with db.transaction() as conn:
        with translate_errors():
            kind = kind or await _infer_kind(conn, backend_job_id)
            orphan = await orphan_admin.lock_orphan(conn, kind, backend_job_id)
            obstacle = dismiss_obstacle(kind, backend_job_id, orphan)
            if obstacle is not None:
                raise OperatorError(obstacle)
            assert orphan is not None
            await orphan_admin.dismiss(conn, kind, backend_job_id)
            decision_id = await orphan_admin.record_decision(
                conn,
                kind=kind,
                backend_job_id=backend_job_id,
                job_id=None,
                rule="operator",
                outcome="dismissed",
                evidence={"user_id": orphan.user_id, "state_before": orphan.state},
                actor=actor,
                reason=reason,
            )
    return Dismissed(kind, backend_job_id, orphan.state, decision_id)


async def _infer_kind(conn: asyncpg.Connection, backend_job_id: str) -> Kind:
    kinds = await orphan_admin.orphan_kinds(conn, backend_job_id)
    if not kinds:
        raise OperatorError(f"no orphan has backend job id {backend_job_id!r}")
    if len(kinds) > 1:
        raise OperatorError(
            f"an image and a video orphan both have backend job id {backend_job_id!r}: "
            "pass --kind"
        )
    return kinds[0]
