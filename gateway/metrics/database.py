"""Gauges read from the database at scrape time, by the process that answers the scrape.

They are never stored in the multiprocess files, so N workers do not report them N times.
The figures of active jobs, the outbox, orphans and the reconciler come from one cheap
query cached for a few seconds; counting finished jobs visits every finished row and is
refreshed less often. When the database does not answer, the scrape still succeeds with
`sorami_database_up 0` and without these gauges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.jobs.kinds import Kind
from gateway.jobs.state import TERMINAL, Status
from gateway.store import stats
from gateway.store.database import Database
from gateway.store.errors import StoreError
from gateway.store.stats import Backlog

log = structlog.get_logger(__name__)

ACTIVE_STATUSES = tuple(s for s in Status if s not in TERMINAL)


class DatabaseGauges:
    """The database's figures for this process, cached between scrapes."""

    def __init__(
        self,
        database: Database,
        *,
        ttl_seconds: float = 5.0,
        finished_ttl_seconds: float = 60.0,
        timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self._ttl = ttl_seconds
        self._finished_ttl = finished_ttl_seconds
        self._timeout = timeout_seconds
        self._clock = clock
        # single-flight: concurrent scrapes wait for one query instead of each running it
        self._lock = asyncio.Lock()
        self._active: stats.ActiveSnapshot | None = None
        self._active_at = -float("inf")
        self._finished: dict[tuple[str, str], int] | None = None
        self._finished_at = -float("inf")
        self._query_seconds = 0.0
        self._up = False

    async def collect(self) -> list[Metric]:
        """The gauge families, refreshed from the database when the cache is stale."""
        async with self._lock:
            if self._clock() - self._active_at >= self._ttl:
                await self._refresh()
            return self._families()

    async def _refresh(self) -> None:
        started = self._clock()
        refresh_finished = started - self._finished_at >= self._finished_ttl
        try:
            async with asyncio.timeout(self._timeout), self._database.connection() as conn:
                active = await stats.active_snapshot(conn)
                finished = await stats.finished_job_counts(conn) if refresh_finished else None
        except (StoreError, TimeoutError) as exc:
            log.warning("metrics_database_unavailable", error=type(exc).__name__)
            self._mark_down(started)
            return
        except Exception:
            # e.g. the driver's state errors on a connection killed mid-use: the scrape
            # must still answer with the process's own metrics
            log.exception("metrics_database_query_failed")
            self._mark_down(started)
            return
        done = self._clock()
        self._up, self._active, self._active_at = True, active, done
        if finished is not None:
            self._finished, self._finished_at = finished, done
        self._query_seconds = done - started

    def _mark_down(self, at: float) -> None:
        # nothing stale is shown while the database is away; retried after the ttl
        self._up, self._active, self._finished = False, None, None
        self._active_at, self._finished_at = at, -float("inf")

    def _families(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "sorami_database_up",
            "1 when the database answered the last metrics query, 0 when it did not.",
            value=1.0 if self._up else 0.0,
        )
        if not self._up or self._active is None or self._finished is None:
            return [up]
        active = self._active
        # ages advance while the figures sit in the cache
        held = self._clock() - self._active_at
        query = GaugeMetricFamily(
            "sorami_database_metrics_query_seconds",
            "Time the last refresh of the database gauges took.",
            value=self._query_seconds,
        )

        jobs = GaugeMetricFamily(
            "sorami_jobs",
            "Jobs by kind and status (finished statuses refreshed every minute).",
            labels=["kind", "status"],
        )
        oldest_job = GaugeMetricFamily(
            "sorami_jobs_oldest_update_age_seconds",
            "Seconds since the least recently updated active job changed, by kind and status "
            "(0 when there is none).",
            labels=["kind", "status"],
        )
        by_active = {(a.kind, a.status): a for a in active.active_jobs}
        for kind in Kind:
            for status in Status:
                if status in TERMINAL:
                    jobs.add_metric([kind, status], self._finished.get((kind, status), 0))
                    continue
                row = by_active.get((kind, status))
                jobs.add_metric([kind, status], row.count if row else 0)
                oldest_job.add_metric(
                    [kind, status], row.oldest_update_age_seconds + held if row else 0.0
                )

        outbox_due = GaugeMetricFamily(
            "sorami_outbox_due",
            "Outbox calls due now and neither delivered nor failed.",
            value=active.outbox_due,
        )
        outbox_pending = GaugeMetricFamily(
            "sorami_outbox_pending",
            "Outbox calls neither delivered nor failed, including retries scheduled later.",
            value=active.outbox_pending,
        )
        oldest_due = active.outbox_oldest_due_age_seconds
        outbox_age = GaugeMetricFamily(
            "sorami_outbox_oldest_due_age_seconds",
            "Seconds the oldest due outbox call has been waiting (0 when none is due).",
            value=oldest_due + held if oldest_due is not None else 0.0,
        )

        orphans, orphan_age = _backlog_by_kind(
            active.open_orphans, held,
            ("sorami_orphans_unresolved",
             "Orphaned backend jobs not yet resolved (state unresolved or unmatched), by kind."),
            ("sorami_orphans_oldest_unresolved_age_seconds",
             "Seconds since the oldest unresolved orphan was first seen, by kind (0 when none)."),
        )
        waiting, waiting_age = _backlog_by_kind(
            active.admission_waiting, held,
            ("sorami_admission_waiting",
             "Jobs waiting for admission toward the backend (BACKEND_MAX_IN_FLIGHT_*), by kind."),
            ("sorami_admission_oldest_waiting_age_seconds",
             "Seconds the oldest job waiting for admission has waited, by kind (0 when none)."),
        )

        reasons = GaugeMetricFamily(
            "sorami_orphans_open_by_reason",
            "Open orphans by kind and the outcome of their latest decision (undecided: none).",
            labels=["kind", "reason"],
        )
        for kind_name, reason, count in active.open_orphan_reasons:
            reasons.add_metric([kind_name, reason], count)

        reconcile = GaugeMetricFamily(
            "sorami_reconcile_last_success_timestamp_seconds",
            "Unix time the last successful (not dry-run) reconcile run finished; 0 when never.",
            value=active.last_reconcile_success or 0.0,
        )
        return [
            up, query, jobs, oldest_job, outbox_due, outbox_pending, outbox_age,
            orphans, orphan_age, reasons, reconcile, waiting, waiting_age,
        ]


def _backlog_by_kind(
    rows: Iterable[Backlog], held: float, count: tuple[str, str], age: tuple[str, str]
) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """A count and an oldest age per kind (zeros for a kind without rows); ages advanced by
    the `held` seconds the figures sat in the cache."""
    counts = GaugeMetricFamily(*count, labels=["kind"])
    ages = GaugeMetricFamily(*age, labels=["kind"])
    by_kind = {row.kind: row for row in rows}
    for kind in Kind:
        row = by_kind.get(kind)
        counts.add_metric([kind], row.count if row else 0)
        ages.add_metric([kind], row.oldest_age_seconds + held if row else 0.0)
    return counts, ages
