"""A run's figures for a Prometheus Pushgateway (a batch job is gone before any scrape).

Names carry `_run_` so they never collide with the server's database-backed gauges
(`sorami_reconcile_last_success_timestamp_seconds`, `sorami_orphans_unresolved`). Each push
replaces the previous one for the same grouping key; dry runs push under their own key so
they never stand in for a real run.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from reconcile.runner import OUTCOMES, RunResult

JOB = "sorami_reconcile"


def registry_for(result: RunResult) -> CollectorRegistry:
    registry = CollectorRegistry()

    def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, labels, registry=registry)

    gauge("sorami_reconcile_run_finished_timestamp_seconds",
          "Unix time the run finished.").set(result.finished_at.timestamp())
    gauge("sorami_reconcile_run_succeeded",
          "1 when the run succeeded, 0 when it failed.").set(1 if result.succeeded else 0)
    gauge("sorami_reconcile_run_duration_seconds",
          "How long the run took.").set(result.duration_seconds)
    last_success = gauge(
        "sorami_reconcile_run_last_success_timestamp_seconds",
        "Unix time the last successful real (not dry) run finished, from the database; "
        "0 when never.",
    )
    last_success.set(result.last_success_at.timestamp() if result.last_success_at else 0)
    orphans = gauge("sorami_reconcile_run_orphans",
                    "Orphans the run looked at, by outcome.", ("outcome",))
    for outcome in OUTCOMES:
        orphans.labels(outcome).set(result.counts[outcome])
    gauge("sorami_reconcile_run_needs_review",
          "Orphans that need an operator after the run.").set(result.needs_review)
    gauge("sorami_reconcile_run_errors",
          "Orphans or jobs the run could not apply.").set(result.error_count)
    timed_out = gauge("sorami_reconcile_run_jobs_timed_out",
                      "Jobs the run timed out, by kind.", ("kind",))
    for kind, count in result.counts["timed_out"].items():
        timed_out.labels(kind).set(count)
    pruned = gauge("sorami_reconcile_run_pruned_rows",
                   "Rows the run pruned, by table.", ("table",))
    for table, count in result.counts["pruned"].items():
        pruned.labels(table).set(count)
    open_orphans = gauge("sorami_reconcile_run_open_orphans",
                         "Open orphans after the run, by state.", ("state",))
    for state, count in result.open_orphans.items():
        open_orphans.labels(state).set(count)
    return registry


def push(url: str, result: RunResult, *, timeout: float = 10.0) -> None:
    """PUT the run's figures to the Pushgateway at `url` (raises OSError when it fails)."""
    grouping = {"mode": "dry_run"} if result.dry_run else {"mode": "run"}
    push_to_gateway(url, job=JOB, registry=registry_for(result), grouping_key=grouping,
                    timeout=timeout)
