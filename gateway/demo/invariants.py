"""What the gateway promises, checked after the demo against the database (read through the
store) and the simulated backend's own records."""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

import asyncpg

from gateway.demo.scenario import Tracked
from gateway.jobs.state import Status
from gateway.simulator import SimulatedBackend
from gateway.store import overview
from gateway.store.overview import JobOverview, OpenOrphan


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    held: bool
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class Findings:
    """What the database says after the run: per job, per orphan, and the invariants."""

    files: dict[str, int]
    resolution: dict[str, str]
    reviews: list[str]
    checks: list[Check]


class Invariants:
    """What the gateway promises, checked against the database and the backend's records."""

    def __init__(
        self, conn: asyncpg.Connection, tracked: list[Tracked], simulator: SimulatedBackend
    ) -> None:
        self.conn = conn
        self.tracked = tracked
        self.simulator = simulator

    async def findings(self) -> Findings:
        jobs = await overview.jobs(self.conn)
        orphans = await overview.open_orphans(self.conn)
        resolution = {job_id: self._resolution(job) for job_id, job in jobs.items()}
        for orphan in orphans:
            resolution[orphan.backend_job_id] = "needs review"
        reviews = [
            f"{o.kind} {o.backend_job_id[:8]} (user {o.user_id or 'unknown'}, "
            f"prompt {o.prompt!r}): {o.outcome or 'not looked at'} by rule {o.rule}"
            for o in orphans
        ]
        checks = [
            await self._files_on_owners_jobs(),
            await self._no_duplicate_effect(jobs),
            await self._nothing_lost(jobs),
            self._as_expected(jobs, resolution),
            self._reviews_explained(orphans),
        ]
        files = {job_id: job.files for job_id, job in jobs.items()}
        return Findings(files, resolution, reviews, checks)

    @staticmethod
    def _resolution(job: JobOverview) -> str:
        if job.alias_source == "reconciler":
            return "reconciled"
        if job.alias_source == "operator":
            return "assigned"
        if job.alias_source == "delivery":
            return "alias"
        if job.direct:
            return "direct"
        return "needs review"

    async def _files_on_owners_jobs(self) -> Check:
        rows = await overview.file_owners(self.conn)
        wrong = []
        for url, owner in rows:
            backend_id = urlsplit(url).path.split("/")[2]
            sim_job = self.simulator.jobs.get(backend_id)
            if sim_job is None or sim_job.user_id != owner:
                wrong.append(url)
        return Check(
            "every file on its owner's job",
            not wrong and bool(rows),
            f"{len(rows)} files, each traced to the backend job its owner asked for"
            if not wrong
            else f"{len(wrong)} files on another user's job: {wrong[:3]}",
        )

    async def _no_duplicate_effect(self, jobs: dict[str, JobOverview]) -> Check:
        per_job = await overview.notification_types(self.conn)
        problems = []
        for job_id, job in jobs.items():
            types = per_job.get(job_id, [])
            if job.status is Status.COMPLETED and (job.files != 1 or len(types) != 1):
                problems.append(f"{job_id[:8]}: {job.files} files, {types}")
            if job.status is Status.FAILED and (job.files != 0 or len(types) != 1):
                problems.append(f"{job_id[:8]}: {job.files} files, {types}")
        sent = self.simulator.sent
        copies = len(sent)
        distinct = len({s.webhook_id for s in sent})
        duplicates = sum(1 for s in sent if s.outcome == "duplicate")
        return Check(
            "no duplicate effect",
            not problems and duplicates == copies - distinct,
            f"{copies} webhook deliveries, {distinct} distinct, {duplicates} answered "
            f"duplicate; one set of files and one notification per finished job"
            if not problems
            else "; ".join(problems),
        )

    async def _nothing_lost(self, jobs: dict[str, JobOverview]) -> Check:
        sent = self.simulator.sent
        refused = [s for s in sent if s.http_status is None or s.http_status >= 300]
        recorded = await overview.count_deliveries(self.conn)
        distinct = len({s.webhook_id for s in sent})
        missing_jobs = [t for t in self.tracked if t.job_id and t.job_id not in jobs]
        held = not refused and recorded == distinct and not missing_jobs
        return Check(
            "nothing lost",
            held,
            f"{distinct} distinct webhooks sent, {recorded} recorded, every one acknowledged; "
            f"{len(jobs)} jobs created, all present"
            if held
            else f"{len(refused)} unacknowledged, {recorded}/{distinct} recorded, "
            f"{len(missing_jobs)} jobs missing",
        )

    def _as_expected(self, jobs: dict[str, JobOverview], resolution: dict[str, str]) -> Check:
        wrong = []
        for t in self.tracked:
            key = t.job_id or t.backend_id or ""
            status = jobs[key].status if key in jobs else None
            got = (status, resolution.get(key, "?"))
            want = (t.planned.expect_status, t.planned.expect_resolution)
            if got != want:
                wrong.append(f"{t.planned.prompt!r} ({t.planned.user}): {got} != {want}")
        return Check(
            "each backend behaviour absorbed",
            not wrong,
            f"{len(self.tracked)} jobs ended as the behaviour requires" if not wrong
            else "; ".join(wrong),
        )

    @staticmethod
    def _reviews_explained(orphans: list[OpenOrphan]) -> Check:
        unexplained = [o.backend_job_id for o in orphans
                       if o.outcome not in ("ambiguous", "no_candidate")]
        return Check(
            "review items explained",
            not unexplained,
            f"{len(orphans)} orphans left to a person, each with the rule that stopped it"
            if not unexplained
            else f"{len(unexplained)} orphans without a decision",
        )
