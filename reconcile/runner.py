"""One reconcile pass: match orphans to their jobs, time stale jobs out, prune old records.

A pass holds a PostgreSQL advisory lock for its whole length, so a second pass started at
the same time returns at once and does nothing. It decides for every open orphan in one
snapshot (set-based SQL into `reconcile_plan`), applies the matches in batches (one
transaction each, so each orphan is fully applied or untouched), records every decision,
then times out jobs that stopped hearing from the backend and prunes old dedupe records,
delivered outbox rows and the audit rows no orphan needs any more. A dry run decides and
counts the same way and changes nothing but its own entry in `reconcile_runs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog

from gateway.jobs.kinds import Kind
from gateway.settings import Settings
from gateway.store import outbox, retention, stale_jobs
from gateway.store.database import Database, translate_errors
from gateway.store.errors import StoreUnavailable
from gateway.store.reconcile import apply as store_matches
from gateway.store.reconcile import plan as store_plan
from gateway.store.reconcile import review as store_review
from gateway.store.reconcile import runs
from gateway.store.reconcile.review import ReviewItem
from gateway.usecases import matching

if TYPE_CHECKING:
    import asyncpg

log = structlog.get_logger(__name__)

OUTCOMES: Final = ("matched", "waiting", "ambiguous", "no_candidate", "expired")
# a job created this long after the orphan was first seen still counts (clock skew)
CLOCK_SKEW_SECONDS: Final = 5.0
# errors kept in the result; the count is complete, the messages are a sample
_MAX_ERRORS: Final = 20

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class RunOptions:
    dry_run: bool = False
    grace_seconds: float = 60.0
    window_seconds: float = 6 * 3600.0
    expire_after_seconds: float = 24 * 3600.0
    image_timeout_seconds: float = 15 * 60.0
    video_timeout_seconds: float = 60 * 60.0
    retention_seconds: float = 7 * 86400.0
    audit_retention_seconds: float = 30 * 86400.0
    # transactions applied side by side: each touches a batch of orphans and jobs of its own
    concurrency: int = 4
    # orphans (or stale jobs) applied per transaction: a constant number of statements each
    batch_size: int = 500
    review_limit: int = 100
    # rows deleted per statement by the retention step
    prune_batch_size: int = 5000

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> RunOptions:
        base = cls(
            image_timeout_seconds=float(settings.job_timeout_image_seconds),
            video_timeout_seconds=float(settings.job_timeout_video_seconds),
            retention_seconds=float(settings.dedupe_retention_seconds),
            audit_retention_seconds=float(settings.reconcile_audit_retention_seconds),
        )
        return dataclasses.replace(base, **changes)

    def timeout_seconds(self, kind: Kind) -> float:
        return self.image_timeout_seconds if kind is Kind.IMAGE else self.video_timeout_seconds


@dataclasses.dataclass(frozen=True, slots=True)
class RunResult:
    run_id: int
    dry_run: bool
    state: str
    started_at: dt.datetime
    finished_at: dt.datetime
    counts: dict[str, Any]
    needs_review: int
    review: list[ReviewItem]
    errors: list[str]
    error_count: int
    options: RunOptions
    last_success_at: dt.datetime | None
    open_orphans: dict[str, int]

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


async def run_once(db: Database, options: RunOptions) -> RunResult | None:
    """One pass; None when another pass holds the lock (nothing was done)."""
    async with db.connection() as conn:
        with translate_errors():
            if not await runs.try_run_lock(conn):
                log.info("reconcile_run_skipped", reason="another run is in progress")
                return None
            try:
                return await _Pass(db, conn, options).run()
            finally:
                await runs.release_run_lock(conn)


class _Pass:
    def __init__(self, db: Database, conn: asyncpg.Connection, options: RunOptions) -> None:
        self.db = db
        self.conn = conn  # holds the run lock; also reads the plan and the stale jobs
        self.options = options
        self.errors: list[str] = []
        self.error_count = 0

    async def run(self) -> RunResult:
        o = self.options
        run = await runs.start_run(self.conn, dry_run=o.dry_run)
        log.info("reconcile_run_started", run_id=run.id, dry_run=o.dry_run)
        try:
            counts = await self._steps(run)
            needs_review, review = await store_review.review(self.conn, run.id,
                                                             limit=o.review_limit)
            counts["needs_review"] = needs_review
            state = "failed" if self.error_count else "succeeded"
            error = f"{self.error_count} error(s); first: {self.errors[0]}" if self.errors else None
            finished_at = await runs.finish_run(self.conn, run.id, state=state, counts=counts,
                                                 error=error)
            status = await store_review.status(self.conn)
        except BaseException as exc:
            await self._record_failure(run.id, exc)
            raise
        finally:
            await self._clear_plan(run.id)
        log.info("reconcile_run_finished", run_id=run.id, state=state, dry_run=o.dry_run,
                 **_flat(counts))
        return RunResult(
            run_id=run.id, dry_run=o.dry_run, state=state, started_at=run.started_at,
            finished_at=finished_at, counts=counts, needs_review=needs_review, review=review,
            errors=list(self.errors), error_count=self.error_count, options=o,
            last_success_at=status.last_success_at, open_orphans=status.open_orphans,
        )

    async def _steps(self, run: runs.Run) -> dict[str, Any]:
        o = self.options
        plan = store_plan.PlanParameters(
            run_at=run.started_at,
            grace_seconds=o.grace_seconds,
            window_seconds=o.window_seconds,
            expire_after_seconds=o.expire_after_seconds,
            skew_seconds=CLOCK_SKEW_SECONDS,
        )
        with _phase(run.id, "plan"):
            await store_plan.build_plan(self.conn, run.id, plan)
        apply_failed = 0
        if not o.dry_run:
            with _phase(run.id, "apply"):
                apply_failed = await self._apply_matches(run.id)
            with _phase(run.id, "record"):
                await store_matches.record_unapplied(self.conn, run.id)
        outcomes = await store_plan.plan_counts(self.conn, run.id)
        counts: dict[str, Any] = {"looked_at": sum(outcomes.values())}
        counts.update({outcome: outcomes.get(outcome, 0) for outcome in OUTCOMES})
        counts["apply_failed"] = apply_failed
        with _phase(run.id, "timeouts"):
            counts["timed_out"] = await self._time_out(run.started_at)
        with _phase(run.id, "retention"):
            counts["pruned"] = await self._prune(run.started_at)
        return counts

    async def _apply_matches(self, run_id: int) -> int:
        failed = 0

        def report(m: store_matches.PlannedMatch, result: matching.MatchResult) -> None:
            nonlocal failed
            if result.matched:
                log.debug("reconcile_matched", run_id=run_id, kind=m.kind.value,
                          backend_job_id=m.backend_job_id, job_id=m.job_id, rule=m.rule,
                          replayed=result.replayed, job_status=result.job_status)
            elif result.failed:
                failed += 1
                self._error(f"{m.kind.value} orphan {m.backend_job_id}: {result.reason}")
                log.error("reconcile_apply_failed", run_id=run_id, kind=m.kind.value,
                          backend_job_id=m.backend_job_id, job_id=m.job_id,
                          reason=result.reason)
            else:
                log.info("reconcile_match_withdrawn", run_id=run_id, kind=m.kind.value,
                         backend_job_id=m.backend_job_id, job_id=m.job_id, reason=result.reason)

        async def apply_one(conn: asyncpg.Connection, m: store_matches.PlannedMatch) -> None:
            nonlocal failed
            try:
                with translate_errors():
                    async with conn.transaction():
                        result = await matching.apply_match(conn, run_id, m)
            except StoreUnavailable:
                raise
            except Exception as exc:
                failed += 1
                self._error(f"{m.kind.value} orphan {m.backend_job_id}: {exc!r}")
                log.exception("reconcile_apply_failed", run_id=run_id, kind=m.kind.value,
                              backend_job_id=m.backend_job_id, job_id=m.job_id)
                async with conn.transaction():
                    await matching.record_failure(conn, run_id, m.plan_id, repr(exc))
                return
            report(m, result)

        async def apply(conn: asyncpg.Connection, batch: list[store_matches.PlannedMatch]) -> None:
            try:
                with translate_errors():
                    async with conn.transaction():
                        results = await matching.apply_matches(conn, run_id, batch)
            except StoreUnavailable:
                raise
            except Exception:
                # one orphan spoils the batch (nothing of it was written): one by one
                log.warning("reconcile_batch_failed", run_id=run_id, matches=len(batch))
                for m in batch:
                    await apply_one(conn, m)
                return
            for m, result in zip(batch, results, strict=True):
                report(m, result)

        matches = store_matches.planned_matches(self.conn, run_id, batch=self.options.batch_size)
        await self._each(_batched(matches, self.options.batch_size), apply)
        return failed

    async def _time_out(self, run_at: dt.datetime) -> dict[str, int]:
        timed_out: dict[str, int] = {}
        for kind in Kind:
            cutoff = run_at - dt.timedelta(seconds=self.options.timeout_seconds(kind))
            if self.options.dry_run:
                timed_out[kind.value] = await stale_jobs.count_stale_jobs(self.conn, kind, cutoff)
            else:
                timed_out[kind.value] = await self._time_out_kind(kind, cutoff)
        return timed_out

    async def _time_out_kind(self, kind: Kind, cutoff: dt.datetime) -> int:
        words = _duration_words(self.options.timeout_seconds(kind))
        message = f"No news from the generator for {words}."
        done = 0

        async def batch(conn: asyncpg.Connection, job_ids: list[str]) -> None:
            nonlocal done
            try:
                # the await first: `done += await ...` would read `done` before suspending
                timed_out = await self._time_out_batch(conn, job_ids, cutoff, message)
                done += timed_out
            except StoreUnavailable:
                raise
            except Exception:
                # one job spoils the batch: time the others out one by one
                for job_id in job_ids:
                    try:
                        timed_out = await self._time_out_batch(conn, [job_id], cutoff, message)
                        done += timed_out
                    except StoreUnavailable:
                        raise
                    except Exception as exc:
                        self._error(f"timing out job {job_id}: {exc!r}")
                        log.exception("reconcile_timeout_failed", job_id=job_id)

        stale = stale_jobs.stale_jobs(self.conn, kind, cutoff, batch=self.options.batch_size)
        await self._each(stale, batch)
        if done:
            # the jobs' admission slots are free: the dispatchers need not wait for a poll
            with translate_errors():
                async with self.db.connection() as conn:
                    await outbox.wake(conn)
        return done

    @staticmethod
    async def _time_out_batch(
        conn: asyncpg.Connection, job_ids: list[str], cutoff: dt.datetime, message: str
    ) -> int:
        with translate_errors():
            async with conn.transaction():
                done = await stale_jobs.time_out(conn, job_ids, cutoff, message)
        log.debug("reconcile_jobs_timed_out", jobs=done)
        return done

    async def _each(
        self,
        items: AsyncIterator[T],
        work: Callable[[asyncpg.Connection, T], Awaitable[None]],
    ) -> None:
        """Run `work` on every item, read lazily, by `concurrency` workers that each keep
        one connection for all their items (one transaction per item)."""
        queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize=self.options.concurrency * 4)

        async def worker() -> None:
            async with self.db.connection() as conn:
                while (item := await queue.get()) is not None:
                    with translate_errors():
                        await work(conn, item)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.options.concurrency):
                    group.create_task(worker())
                async for item in items:
                    await queue.put(item)
                for _ in range(self.options.concurrency):
                    await queue.put(None)
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def _prune(self, run_at: dt.datetime) -> dict[str, int]:
        o = self.options
        cutoff = run_at - dt.timedelta(seconds=o.retention_seconds)
        audit_cutoff = run_at - dt.timedelta(seconds=o.audit_retention_seconds)
        if o.dry_run:
            return (await retention.count_prunable(self.conn, cutoff)
                    | await retention.count_prunable_audit(self.conn, audit_cutoff)
                    | await retention.count_usage_changes(self.conn))
        return (await retention.prune(self.conn, cutoff, batch=o.prune_batch_size)
                | await retention.prune_audit(self.conn, audit_cutoff, batch=o.prune_batch_size)
                | await retention.fold_usage(self.conn))

    def _error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(message)

    async def _record_failure(self, run_id: int, exc: BaseException) -> None:
        """Best effort: the run's row says it failed (its session may be gone too)."""
        try:
            await runs.finish_run(self.conn, run_id, state="failed", counts={},
                                   error=repr(exc)[:1000])
        except Exception:
            log.warning("reconcile_run_not_recorded", run_id=run_id)

    async def _clear_plan(self, run_id: int) -> None:
        try:
            await runs.clear_plan(self.conn, run_id)
        except Exception:
            log.warning("reconcile_plan_not_cleared", run_id=run_id)  # the next run clears it


async def _batched(items: AsyncIterator[T], size: int) -> AsyncIterator[list[T]]:
    """Lists of up to `size` items, read lazily."""
    batch: list[T] = []
    async for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _phase(run_id: int, name: str) -> Iterator[None]:
    """Log how long a step of the run took (where the time goes at scale)."""
    started = time.monotonic()
    yield
    log.info("reconcile_phase_done", run_id=run_id, phase=name,
             seconds=round(time.monotonic() - started, 3))


def _flat(counts: dict[str, Any]) -> dict[str, Any]:
    """{'timed_out': {'image': 1}} -> {'timed_out_image': 1}, for one log line."""
    flat: dict[str, Any] = {}
    for key, value in counts.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _duration_words(seconds: float) -> str:
    if seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return f"{hours} hour{'s' if hours != 1 else ''}"
    if seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} seconds"
