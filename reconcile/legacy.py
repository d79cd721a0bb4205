"""`sorami-reconcile import-legacy`: the report of an import, as text or one JSON object,
and its progress on a terminal."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from gateway.usecases.legacy_import import ImportReport


def report_json(report: ImportReport) -> dict[str, Any]:
    return {
        "dry_run": report.dry_run,
        "kinds": {
            kind.value: {
                "jobs": c.jobs,
                "files": c.files,
                "misattributed": c.misattributed,
                "updated": c.updated,
                "already_imported": c.already_imported,
            } for kind, c in report.kinds.items()
        },
        "notifications": report.notifications,
        "notifications_withheld": report.notifications_withheld,
        "skipped": [{"table": s.table, "id": s.id, "reason": s.reason}
                    for s in report.skipped],
        "repairs": [{"kind": r.kind, "backend_job_id": r.backend_job_id,
                     "taken_from": r.taken_from, "state": r.state, "job_id": r.job_id,
                     "given_to": r.given_to, "reason": r.reason} for r in report.repairs],
    }


def write_summary(out: TextIO, report: ImportReport) -> None:
    verb = "would import" if report.dry_run else "imported"
    for kind, c in report.kinds.items():
        out.write(f"{kind.value}: {verb} {c.jobs} job(s) with {c.files} file(s); "
                  f"{c.misattributed} misattributed row(s) made orphans for the reconciler; "
                  f"{c.updated} updated, {c.already_imported} already imported\n")
    out.write(f"notifications: {verb} {report.notifications}; "
              f"{report.notifications_withheld} backend-direct notification(s) of "
              f"misattributed rows not given to the first user\n")
    out.write(f"skipped: {len(report.skipped)} row(s)\n")
    for s in report.skipped:
        out.write(f"  {s.table} {s.id}: {s.reason}\n")
    given = [r for r in report.repairs if r.given_to is not None]
    open_ = [r for r in report.repairs if r.given_to is None]
    out.write(f"misattributed rows so far: {len(given)} given back, "
              f"{len(open_)} not (yet)\n")
    for r in given:
        out.write(f"  {r.kind} {r.backend_job_id}: from {r.taken_from} to {r.given_to} "
                  f"(job {r.job_id})\n")
    for r in open_:
        out.write(f"  {r.kind} {r.backend_job_id}: {r.state}, "
                  f"{r.reason or 'not looked at by a run yet'}\n")
    if report.dry_run:
        out.write("dry run: nothing was written\n")
    else:
        out.write("next: `sorami-reconcile run` gives the orphans back to their owners, "
                  "`sorami-reconcile orphans` lists what is left for review\n")


class ProgressLine:
    """Rows read per table, rewritten in place on a terminal; silent otherwise."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self._out = out
        self._counts: dict[str, int] = {}
        self._on = out.isatty()

    def __call__(self, table: str, rows: int) -> None:
        self._counts[table] = self._counts.get(table, 0) + rows
        if self._on:
            line = "  ".join(f"{t} {n:,}" for t, n in self._counts.items())
            self._out.write(f"\rimporting: {line}")
            self._out.flush()

    def close(self) -> None:
        if self._on and self._counts:
            self._out.write("\n")
