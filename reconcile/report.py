"""What a run and a listing print: a human summary and tables, or JSON."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, TextIO

import msgspec

from gateway.store.reconcile.review import ReviewItem
from reconcile.runner import OUTCOMES, RunResult

_encode = msgspec.json.Encoder(order="deterministic").encode
PROMPT_WIDTH = 48


def run_json(result: RunResult) -> dict[str, Any]:
    o = result.options
    return {
        "run_id": result.run_id,
        "state": result.state,
        "dry_run": result.dry_run,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "duration_seconds": round(result.duration_seconds, 3),
        "parameters": {
            "grace_seconds": o.grace_seconds,
            "window_seconds": o.window_seconds,
            "expire_after_seconds": o.expire_after_seconds,
            "image_timeout_seconds": o.image_timeout_seconds,
            "video_timeout_seconds": o.video_timeout_seconds,
            "retention_seconds": o.retention_seconds,
            "audit_retention_seconds": o.audit_retention_seconds,
        },
        "counts": result.counts,
        "needs_review": result.needs_review,
        "review": [review_json(item) for item in result.review],
        "review_truncated": result.needs_review > len(result.review),
        "open_orphans": result.open_orphans,
        "errors": result.errors,
        "error_count": result.error_count,
    }


def review_json(item: ReviewItem) -> dict[str, Any]:
    return {
        "kind": item.kind,
        "backend_job_id": item.backend_job_id,
        "state": item.state,
        "outcome": item.outcome,
        "rule": item.rule,
        "reason": item.reason,
        "user_id": item.user_id,
        "prompt": item.prompt,
        "first_seen_at": item.first_seen_at,
        "file_count": item.file_count,
        "event_count": item.event_count,
        "evidence": item.evidence,
    }


def write_json(out: TextIO, value: Any) -> None:
    out.write(_encode(value).decode() + "\n")


def write_run_summary(out: TextIO, result: RunResult) -> None:
    c = result.counts
    mode = " (dry run: nothing was changed)" if result.dry_run else ""
    out.write(f"reconcile run {result.run_id} {result.state} in "
              f"{result.duration_seconds:.2f} s{mode}\n")
    out.write(f"  orphans looked at  {c['looked_at']}\n")
    for outcome in OUTCOMES:
        out.write(f"    {outcome:<15}  {c[outcome]}\n")
    if c.get("apply_failed"):
        out.write(f"    {'apply failed':<15}  {c['apply_failed']}\n")
    timed_out = c["timed_out"]
    out.write(f"  jobs timed out     {sum(timed_out.values())}"
              f"  (image {timed_out['image']}, video {timed_out['video']})\n")
    pruned = c["pruned"]
    out.write(f"  pruned             {pruned['webhook_deliveries']} webhook deliveries, "
              f"{pruned['outbox']} outbox rows, {pruned['reconcile_decisions']} decisions, "
              f"{pruned['reconcile_runs']} runs, {pruned['job_usage_changes']} usage changes "
              f"folded\n")
    open_ = result.open_orphans
    out.write(f"  open orphans       {open_['unresolved']} unresolved, "
              f"{open_['unmatched']} unmatched\n")
    out.write(f"  needs review       {result.needs_review}\n")
    for error in result.errors:
        out.write(f"  error: {error}\n")
    if result.error_count > len(result.errors):
        out.write(f"  ... and {result.error_count - len(result.errors)} more error(s)\n")
    if result.review:
        out.write("\nneeds review (oldest first):\n")
        write_review_table(out, result.review)
        if result.needs_review > len(result.review):
            rest = result.needs_review - len(result.review)
            out.write(f"... and {rest} more: sorami-reconcile orphans --status open\n")


_REVIEW_COLUMNS = (("KIND", 5), ("BACKEND JOB ID", 36), ("STATE", 10), ("OUTCOME", 12),
                   ("RULE", 11), ("USER", 16), ("FIRST SEEN (UTC)", 19), ("REASON", 0))


def write_review_table(out: TextIO, items: list[ReviewItem]) -> None:
    out.write(_row([name for name, _ in _REVIEW_COLUMNS]))
    for item in items:
        reason = item.reason or ""
        if item.prompt:
            reason = f"{reason}; prompt {_short(item.prompt)!r}" if reason else _short(item.prompt)
        out.write(_row([item.kind, item.backend_job_id, item.state, item.outcome or "-",
                        item.rule or "-", item.user_id or "-", _when(item.first_seen_at),
                        reason]))


_ORPHAN_COLUMNS = (("KIND", 5), ("BACKEND JOB ID", 36), ("STATE", 10), ("USER", 16),
                   ("FIRST SEEN (UTC)", 19), ("EVENTS", 6), ("FILES", 5),
                   ("LAST DECISION", 24), ("JOB", 36), ("PROMPT", 0))


async def write_orphans_table(out: TextIO, rows: AsyncIterator[dict[str, Any]]) -> int:
    """Stream a table of orphans; returns how many were written."""
    out.write(_row([name for name, _ in _ORPHAN_COLUMNS], _ORPHAN_COLUMNS))
    count = 0
    async for r in rows:
        decision = "-"
        if r["last_outcome"]:
            decision = f"{r['last_outcome']}/{r['last_rule']}"
        out.write(_row([r["kind"], r["backend_job_id"], r["state"], r["user_id"] or "-",
                        _when(r["first_seen_at"]), str(r["event_count"]), str(r["file_count"]),
                        decision, r["job_id"] or "-", _short(r["prompt"] or "-")],
                       _ORPHAN_COLUMNS))
        count += 1
    out.write(f"{count} orphan(s)\n")
    return count


async def write_orphans_json(out: TextIO, rows: AsyncIterator[dict[str, Any]]) -> int:
    """Stream a JSON array of orphans, one element a line; returns how many were written."""
    out.write("[")
    count = 0
    async for r in rows:
        out.write(("\n" if count == 0 else ",\n") + _encode(_orphan_json(r)).decode())
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def _orphan_json(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": r["kind"],
        "backend_job_id": r["backend_job_id"],
        "state": r["state"],
        "user_id": r["user_id"],
        "prompt": r["prompt"],
        "file_count": r["file_count"],
        "event_count": r["event_count"],
        "first_seen_at": r["first_seen_at"],
        "last_seen_at": r["last_seen_at"],
        "job_id": r["job_id"],
        "resolved_at": r["resolved_at"],
        "last_decision": None if r["last_outcome"] is None else {
            "outcome": r["last_outcome"],
            "rule": r["last_rule"],
            "actor": r["last_actor"],
            "reason": r["last_reason"],
            "evidence": r["last_evidence"],
            "decided_at": r["decided_at"],
        },
    }


def _row(values: list[str], columns: tuple[tuple[str, int], ...] = _REVIEW_COLUMNS) -> str:
    cells = []
    for value, (_, width) in zip(values, columns, strict=True):
        cells.append(value if width == 0 else _fit(value, width).ljust(width))
    return "  ".join(cells).rstrip() + "\n"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(text: str) -> str:
    return _fit(" ".join(text.split()), PROMPT_WIDTH)


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
