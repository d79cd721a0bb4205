"""What operators do by hand: list orphans, assign one to a job, dismiss one.

An assignment goes through the same `orphans.attach` as an automatic match (alias, events
replayed through the state machine, one notification) and, like every decision, leaves a
`reconcile_decisions` row, with actor "operator" and the operator's reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from gateway.errors import GatewayError
from gateway.jobs.kinds import Kind
from gateway.store import jobs as store_jobs
from gateway.store import orphans
from gateway.store import reconcile as store
from gateway.store.database import Database, translate_errors

if TYPE_CHECKING:
    import asyncpg

STATUS_CHOICES = ("open", "unresolved", "unmatched", "matched", "assigned", "dismissed", "all")
_STATES = {
    "open": store.OPEN_STATES,
    "all": ("unresolved", "unmatched", "matched", "assigned", "dismissed"),
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
        async for row in store.list_orphans(conn, states_for(status)):
            yield dict(row.items())


async def assign(
    db: Database,
    backend_job_id: str,
    job_id: str,
    *,
    reason: str,
    kind: Kind | None = None,
    allow_other_user: bool = False,
) -> Assigned:
    """Attach an orphan to a job chosen by an operator, and record why."""
    async with db.transaction() as conn:
        with translate_errors():
            kind = kind or await _infer_kind(conn, backend_job_id)
            job = await store_jobs.lock(conn, job_id)
            if job is None:
                raise OperatorError(f"no job has id {job_id!r}")
            if job.kind is not kind:
                raise OperatorError(
                    f"job {job_id} is a {job.kind.value} job and the orphan a {kind.value} one"
                )
            orphan = await _locked_orphan(conn, kind, backend_job_id)
            if orphan["state"] in ("matched", "assigned"):
                raise OperatorError(
                    f"the {kind.value} orphan {backend_job_id} is {orphan['state']} already "
                    f"(job {orphan['job_id']})"
                )
            hinted = orphan["user_id"]
            if hinted is not None and hinted != job.user_id and not allow_other_user:
                raise OperatorError(
                    f"the orphan names user {hinted!r} but job {job_id} belongs to user "
                    f"{job.user_id!r}; pass --allow-other-user if that is really meant"
                )
            state = await store.match_state(conn, kind, backend_job_id, job_id)
            if state is None:  # cannot happen: the orphan's row is locked
                raise OperatorError(f"the {kind.value} orphan {backend_job_id} disappeared")
            if state.alias_job_id not in (None, job_id):
                raise OperatorError(
                    f"backend job id {backend_job_id} is an alias of job {state.alias_job_id}"
                )
            if state.job_has_other_alias:
                raise OperatorError(f"job {job_id} already has another backend job id")
            attached = await orphans.attach(conn, kind, backend_job_id, job, source="operator")
            status = attached.job.state.status.value
            decision_id = await store.record_decision(
                conn,
                kind=kind,
                backend_job_id=backend_job_id,
                job_id=job_id,
                rule="operator",
                outcome="assigned",
                evidence={
                    "user_id": hinted,
                    "job_user_id": job.user_id,
                    "state_before": orphan["state"],
                    "replayed_events": len(attached.transitions),
                    "job_status": status,
                },
                actor="operator",
                reason=reason,
            )
    return Assigned(kind, backend_job_id, job_id, job.user_id, len(attached.transitions),
                    status, decision_id)


async def dismiss(
    db: Database, backend_job_id: str, *, reason: str, kind: Kind | None = None
) -> Dismissed:
    """Close an orphan that belongs to no job (its events stay stored), and record why."""
    async with db.transaction() as conn:
        with translate_errors():
            kind = kind or await _infer_kind(conn, backend_job_id)
            orphan = await _locked_orphan(conn, kind, backend_job_id)
            if orphan["state"] not in store.OPEN_STATES:
                raise OperatorError(
                    f"the {kind.value} orphan {backend_job_id} is {orphan['state']} already"
                )
            await store.dismiss(conn, kind, backend_job_id)
            decision_id = await store.record_decision(
                conn,
                kind=kind,
                backend_job_id=backend_job_id,
                job_id=None,
                rule="operator",
                outcome="dismissed",
                evidence={"user_id": orphan["user_id"], "state_before": orphan["state"]},
                actor="operator",
                reason=reason,
            )
    return Dismissed(kind, backend_job_id, orphan["state"], decision_id)


async def _infer_kind(conn: asyncpg.Connection, backend_job_id: str) -> Kind:
    kinds = await store.orphan_kinds(conn, backend_job_id)
    if not kinds:
        raise OperatorError(f"no orphan has backend job id {backend_job_id!r}")
    if len(kinds) > 1:
        raise OperatorError(
            f"an image and a video orphan both have backend job id {backend_job_id!r}: "
            "pass --kind"
        )
    return kinds[0]


async def _locked_orphan(
    conn: asyncpg.Connection, kind: Kind, backend_job_id: str
) -> asyncpg.Record:
    orphan = await store.lock_orphan(conn, kind, backend_job_id)
    if orphan is None:
        raise OperatorError(f"no {kind.value} orphan has backend job id {backend_job_id!r}")
    return orphan
