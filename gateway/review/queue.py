"""The review queue as the console and its API show it: a page of open orphans, one orphan
with its evidence and ranked candidates, and the operator's decisions through the same use
cases as `sorami-reconcile assign` / `dismiss`."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated, Any

import msgspec
import structlog

from gateway.api import cursors
from gateway.errors import Conflict, NotFound, Unprocessable
from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode_stored, parse_dimensions
from gateway.jobs.prompts import normalize
from gateway.metrics import REVIEW_DECISIONS
from gateway.store import review as store_review
from gateway.store.database import Database
from gateway.usecases import operators

log = structlog.get_logger(__name__)

# jobs created this long around an orphan's first sighting are its candidates (the
# reconciler's default matching window)
CANDIDATE_WINDOW_SECONDS = 6 * 3600.0
# one bulk dismissal closes at most this many orphans
BULK_MAX = 1000

Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
Text = Annotated[str, msgspec.Meta(max_length=512)]


class ReviewQuery(msgspec.Struct, kw_only=True):
    kind: Kind | None = None
    user_id: Text | None = None
    q: Annotated[str, msgspec.Meta(max_length=2000,
                                   description="prompt text, normalised")] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 50
    cursor: Annotated[str, msgspec.Meta(max_length=512)] | None = None

    def filters(self) -> store_review.Filters:
        return store_review.Filters(self.kind, self.user_id or None,
                                    normalize(self.q) if self.q else None)


class AssignBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    job_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    reason: Reason
    allow_other_user: bool = False


class DismissBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Reason


class BulkDismissBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Reason
    count: Annotated[int, msgspec.Meta(ge=1, le=BULK_MAX,
                                       description="how many orphans the filter matches, as "
                                                   "the operator saw it")]
    kind: Kind | None = None
    user_id: Text | None = None
    q: Annotated[str, msgspec.Meta(max_length=2000)] | None = None


class ReviewPage(msgspec.Struct):
    orphans: list[dict[str, Any]]
    # on the first page only: counting reads every orphan the filter matches
    counts: dict[str, int] | None
    next_cursor: str | None


class OrphanView(msgspec.Struct):
    orphan: dict[str, Any]
    hints: dict[str, Any]
    files: list[dict[str, Any]]
    events: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    candidates: list[dict[str, Any]]


class Decision(msgspec.Struct):
    outcome: str
    kind: Kind
    backend_job_id: str
    decision_id: int
    actor: str
    job_id: str | None = None
    job_status: str | None = None
    replayed_events: int | None = None


class BulkDismissed(msgspec.Struct):
    dismissed: int
    refused: list[dict[str, str]]


def reason_text(reason: str) -> str:
    if not reason.strip():
        raise Unprocessable("reason: must say why", field="reason")
    return reason.strip()


async def page(db: Database, query: ReviewQuery) -> ReviewPage:
    filters = query.filters()
    after = cursors.review_key(query.cursor) if query.cursor else None
    async with db.connection() as conn:
        rows = await store_review.open_orphans(conn, filters, limit=query.limit + 1,
                                               after=after)
        counts = None if after else await store_review.counts_by_reason(conn, filters)
    shown, more = rows[: query.limit], len(rows) > query.limit
    now = dt.datetime.now(dt.UTC)
    items = [{
        "kind": r["kind"], "backend_job_id": r["backend_job_id"], "state": r["state"],
        "user_id": r["user_id"], "prompt": r["prompt"], "file_count": r["file_count"],
        "event_count": r["event_count"], "first_seen_at": r["first_seen_at"],
        "age_seconds": round((now - r["first_seen_at"]).total_seconds(), 1),
        "reason": r["outcome"] or "undecided", "rule": r["rule"], "why": r["why"],
        "media_url": r["media_url"],
    } for r in shown]
    last = shown[-1] if shown else None
    return ReviewPage(
        orphans=items, counts=counts,
        next_cursor=cursors.encode(last["first_seen_at"], last["kind"], last["backend_job_id"])
        if more and last is not None else None,
    )


def _candidate(row: Any, hinted_user: str | None, prompt_norm: str | None) -> dict[str, Any]:
    same_prompt = prompt_norm is not None and row["prompt_norm"] == prompt_norm
    same_user = hinted_user is not None and row["user_id"] == hinted_user
    return {
        "job_id": row["id"], "user_id": row["user_id"], "prompt": row["prompt"],
        "params": row["params"], "status": row["status"], "created_at": row["created_at"],
        "file_count": row["file_count"], "heard_from_backend": row["first_webhook_at"] is not None,
        "considered": row["considered"], "same_prompt": same_prompt, "hinted_user": same_user,
        # the order a person should look at them in: what the evidence points at first
        "score": 4 * same_prompt + 2 * same_user + row["considered"],
    }


async def orphan(db: Database, kind: Kind, backend_job_id: str) -> OrphanView:
    async with db.connection() as conn:
        detail = await store_review.orphan_detail(
            conn, kind, backend_job_id, window_seconds=CANDIDATE_WINDOW_SECONDS)
    if detail is None:
        raise NotFound(f"No {kind.value} orphan has backend job id {backend_job_id!r}.")
    o = detail.orphan
    files: list[dict[str, Any]] = []
    for event in detail.events:
        reported = decode_stored(event["payload"]).files(kind)
        if reported:
            files = []
            for f in reported:
                width, height = parse_dimensions(f.dimensions)
                files.append({"url": f.url, "format": f.format, "size_bytes": f.size_bytes,
                              "width": width, "height": height,
                              "duration_seconds": f.duration_seconds})
    candidates = sorted(
        (_candidate(r, o["user_id"], o["prompt_norm"]) for r in detail.candidates),
        key=lambda c: (-c["score"], c["created_at"], c["job_id"]),
    )
    return OrphanView(
        orphan={k: o[k] for k in ("kind", "backend_job_id", "state", "file_count",
                                  "event_count", "first_seen_at", "last_seen_at", "job_id",
                                  "resolved_at")},
        hints={"user_id": o["user_id"], "prompt": o["prompt"]},
        files=files,
        events=[{"id": e["id"], "status": e["event_status"], "received_at": e["received_at"],
                 "applied_at": e["applied_at"], "body": e["payload"]} for e in detail.events],
        decisions=[{k: d[k] for k in ("id", "run_id", "job_id", "rule", "outcome", "evidence",
                                      "actor", "reason", "created_at")}
                   for d in detail.decisions],
        candidates=candidates,
    )


async def assign(db: Database, kind: Kind, backend_job_id: str, body: AssignBody,
                 actor: str) -> Decision:
    try:
        done = await operators.assign(
            db, backend_job_id, body.job_id, reason=reason_text(body.reason), kind=kind,
            allow_other_user=body.allow_other_user, actor=actor)
    except operators.OperatorError as exc:
        REVIEW_DECISIONS.labels(actor=actor, outcome="refused").inc()
        log.info("review_refused", action="assign", kind=kind.value,
                 backend_job_id=backend_job_id, job_id=body.job_id, actor=actor,
                 why=exc.message)
        raise Conflict(exc.message) from None
    REVIEW_DECISIONS.labels(actor=actor, outcome="assigned").inc()
    log.info("review_assigned", kind=kind.value, backend_job_id=backend_job_id,
             job_id=done.job_id, actor=actor, decision_id=done.decision_id)
    return Decision("assigned", kind, backend_job_id, done.decision_id, actor,
                    job_id=done.job_id, job_status=done.job_status,
                    replayed_events=done.replayed)


async def dismiss(db: Database, kind: Kind, backend_job_id: str, reason: str,
                  actor: str) -> Decision:
    try:
        done = await operators.dismiss(db, backend_job_id, reason=reason_text(reason),
                                       kind=kind, actor=actor)
    except operators.OperatorError as exc:
        REVIEW_DECISIONS.labels(actor=actor, outcome="refused").inc()
        log.info("review_refused", action="dismiss", kind=kind.value,
                 backend_job_id=backend_job_id, actor=actor, why=exc.message)
        raise Conflict(exc.message) from None
    REVIEW_DECISIONS.labels(actor=actor, outcome="dismissed").inc()
    log.info("review_dismissed", kind=kind.value, backend_job_id=backend_job_id, actor=actor,
             decision_id=done.decision_id)
    return Decision("dismissed", kind, backend_job_id, done.decision_id, actor)


@dataclasses.dataclass(frozen=True, slots=True)
class _Target:
    kind: Kind
    backend_job_id: str


async def bulk_dismiss(db: Database, body: BulkDismissBody, actor: str) -> BulkDismissed:
    """Dismiss every open orphan the filter matches, when it matches exactly `count`."""
    reason = reason_text(body.reason)
    filters = ReviewQuery(kind=body.kind, user_id=body.user_id, q=body.q).filters()
    async with db.connection() as conn:
        rows = await store_review.open_orphans(conn, filters, limit=BULK_MAX + 1)
    if len(rows) != body.count:
        raise Conflict(f"the filter matches {len(rows)} open orphans now, not {body.count}; "
                       "reload and confirm again", matching=len(rows))
    targets = [_Target(Kind(r["kind"]), r["backend_job_id"]) for r in rows]
    dismissed, refused = 0, []
    for target in targets:
        try:
            await dismiss(db, target.kind, target.backend_job_id, reason, actor)
            dismissed += 1
        except Conflict as exc:  # decided by someone else meanwhile: say so, go on
            refused.append({"kind": target.kind.value, "backend_job_id": target.backend_job_id,
                            "why": exc.message})
    return BulkDismissed(dismissed, refused)
