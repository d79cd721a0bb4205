"""`sorami-gateway demo`: the whole flow on the embedded default, against the simulated backend.

It starts the embedded PostgreSQL (a fresh `sorami_demo` database beside the user's data),
the gateway and the simulated backend on free local ports, makes tokens for three users and
submits a mix of image and video jobs covering every backend behaviour, among them two users
sending the same prompt at the same moment. It shows live progress, runs one reconcile pass,
prints how each job was resolved and checks the invariants the gateway promises. It exits 0
only when every invariant held.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import jwt
from aiohttp import web
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gateway.app import create_app
from gateway.embedded import embedded_postgres, new_webhook_secret
from gateway.settings import Secret, Settings
from gateway.simulator import SimulatedBackend, SimulatorConfig, parse_mode
from gateway.store.dsn import with_database
from gateway.store.migrations import migrate

DEMO_DATABASE = "sorami_demo"
USERS = ("alice", "bob", "chloe")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


@dataclasses.dataclass(frozen=True, slots=True)
class Planned:
    """One job of the demo and what the gateway must make of it."""

    user: str
    kind: str
    prompt: str
    mode: str
    expect_status: str
    expect_resolution: str
    # sent straight to the backend, as the old app did for videos: no gateway job
    direct_to_backend: bool = False
    group: int = 0  # jobs of one group are sent at the same moment


BASE_PLAN = (
    Planned("alice", "image", "a lighthouse at dawn, watercolor", "honest", "COMPLETED",
            "direct"),
    Planned("bob", "video", "waves rolling on a black sand beach", "honest", "COMPLETED",
            "direct"),
    Planned("chloe", "image", "a red fox curled up in fresh snow", "own-uuid", "COMPLETED",
            "alias"),
    Planned("alice", "image", "a bowl of ramen, studio lighting", "lost-answer", "COMPLETED",
            "direct"),
    Planned("bob", "image", "an origami crane on a wooden desk", "duplicates", "COMPLETED",
            "direct"),
    Planned("chloe", "video", "a hummingbird drinking from a flower", "out-of-order",
            "COMPLETED", "direct"),
    Planned("alice", "image", "a neon city street in the rain", "fail", "FAILED", "direct"),
    Planned("bob", "image", "a mountain cabin under the northern lights", "slow", "COMPLETED",
            "direct"),
    Planned("chloe", "image", "a cup of coffee with latte art", "no-hints", "COMPLETED",
            "direct"),
    Planned("alice", "image", "a sailboat on a calm lake", "own-uuid+lost-answer", "COMPLETED",
            "reconciled"),
    Planned("bob", "video", "a paper boat in a puddle", "own-uuid+lost-answer+no-hints",
            "COMPLETED", "reconciled"),
    # two users, the same prompt, the same moment: each result must reach its own user
    Planned("alice", "image", "a cat wearing sunglasses", "own-uuid+lost-answer", "COMPLETED",
            "reconciled", group=1),
    Planned("bob", "image", "a cat wearing sunglasses", "own-uuid+lost-answer", "COMPLETED",
            "reconciled", group=1),
    # the same again without any hint: nobody can tell whose it is, so a person decides
    Planned("chloe", "image", "a cat astronaut floating in space",
            "own-uuid+lost-answer+no-hints", "QUEUED", "needs review", group=2),
    Planned("alice", "image", "a cat astronaut floating in space",
            "own-uuid+lost-answer+no-hints", "QUEUED", "needs review", group=2),
    # started on the backend directly, never through the gateway: no job to give it to
    Planned("bob", "video", "a timelapse of a blooming rose", "own-uuid", "-", "needs review",
            direct_to_backend=True),
)


def plan(jobs: int) -> list[Planned]:
    """The base plan, then honest extra jobs to reach `jobs` (never fewer than the base)."""
    planned = list(BASE_PLAN)
    extra = 0
    while len(planned) < jobs:
        user = USERS[extra % len(USERS)]
        kind = "video" if extra % 4 == 3 else "image"
        planned.append(
            Planned(user, kind, f"study #{extra + 1} of light on water", "honest", "COMPLETED",
                    "direct")
        )
        extra += 1
    return planned


@dataclasses.dataclass(slots=True)
class Tracked:
    planned: Planned
    job_id: str | None = None
    backend_id: str | None = None
    status: str = "-"
    progress: int = 0


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def fresh_database(admin_dsn: str) -> str:
    """A new, migrated `sorami_demo` database beside the user's own."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DEMO_DATABASE}")
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, DEMO_DATABASE)
    await migrate(dsn)
    return dsn


@contextlib.asynccontextmanager
async def _serving(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield
    finally:
        await runner.cleanup()


class Demo:
    def __init__(self, console: Console, jobs: int, fast: bool) -> None:
        self.console = console
        self.tracked = [Tracked(p) for p in plan(jobs)]
        self.fast = fast
        self.step_delay = 0.05 if fast else 0.4
        self.hs256 = secrets.token_urlsafe(48)
        self.webhook_secret = new_webhook_secret()

    def token(self, user: str) -> str:
        now = int(time.time())
        return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, self.hs256, "HS256")

    def _auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}

    async def run(self, dsn: str) -> int:
        gateway_port, backend_port = _free_port(), _free_port()
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        backend_url = f"http://127.0.0.1:{backend_port}"
        settings = Settings(
            database_url=Secret(dsn),
            port=gateway_port,
            webhook_secrets=(Secret(self.webhook_secret),),
            auth_hs256_secret=Secret(self.hs256),
            backend_url=backend_url,
            delivery_retry_schedule=(0.2, 0.5, 1.0, 2.0),
            db_pool_min=1,
            db_pool_max=8,
        )
        simulator = SimulatedBackend(
            SimulatorConfig(
                webhook_base=gateway_url,
                webhook_secret=self.webhook_secret,
                step_delay=self.step_delay,
                plan={t.planned.prompt: parse_mode(t.planned.mode) for t in self.tracked},
            ),
            public_url=backend_url,
        )
        self.console.print(
            f"[bold]sorami-gateway demo[/]: gateway {gateway_url}, simulated backend "
            f"{backend_url}, {len(self.tracked)} jobs for {', '.join(USERS)}"
        )
        started = time.monotonic()
        async with (
            _serving(simulator.app(), backend_port),
            _serving(create_app(settings), gateway_port),
            aiohttp.ClientSession(base_url=gateway_url) as http,
        ):
            await self._submit(http, backend_url)
            await self._watch(http, simulator)
            reconcile = await self._reconcile(dsn)
            await self._refresh(http)
        elapsed = time.monotonic() - started
        conn = await asyncpg.connect(dsn)
        try:
            findings = await Invariants(conn, self.tracked, simulator).findings()
        finally:
            await conn.close()
        self._report(findings, reconcile, elapsed)
        return 0 if all(c.held for c in findings.checks) else 1

    async def _submit(self, http: aiohttp.ClientSession, backend_url: str) -> None:
        """Submit in plan order; the members of a group at the same moment."""
        batches: list[list[Tracked]] = []
        for t in self.tracked:
            if batches and t.planned.group and batches[-1][0].planned.group == t.planned.group:
                batches[-1].append(t)
            else:
                batches.append([t])
        async with aiohttp.ClientSession() as direct:
            for batch in batches:
                await asyncio.gather(*(self._create(http, direct, backend_url, t) for t in batch))

    async def _create(
        self,
        http: aiohttp.ClientSession,
        direct: aiohttp.ClientSession,
        backend_url: str,
        t: Tracked,
    ) -> None:
        p = t.planned
        if p.direct_to_backend:
            # the old app's video path: straight to the backend, the gateway never told
            body = {"prompt": p.prompt, "user_id": p.user}
            async with direct.post(f"{backend_url}/api/{p.kind}s/generate", json=body) as resp:
                t.backend_id = (await resp.json())["job_id"]
            return
        async with http.post(
            f"/api/{p.kind}s/generate", json={"prompt": p.prompt}, headers=self._auth(p.user)
        ) as resp:
            answer = await resp.json()
            if resp.status != 202:
                raise RuntimeError(f"create answered {resp.status}: {answer}")
            t.job_id, t.status = answer["job_id"], answer["status"]

    async def _watch(self, http: aiohttp.ClientSession, simulator: SimulatedBackend) -> None:
        """Show progress until the backend has sent everything and direct jobs ended."""
        deadline = time.monotonic() + (30 if self.fast else 45)
        live = Live(self._table(), console=self.console, refresh_per_second=8, transient=True)
        last_line = ""
        with live if self.console.is_terminal else contextlib.nullcontext():
            while time.monotonic() < deadline:
                await self._refresh(http)
                if self.console.is_terminal:
                    live.update(self._table())
                elif (line := self._progress_line()) != last_line:
                    # no terminal (CI, a pipe): one line whenever something changed
                    self.console.print(line)
                    last_line = line
                settled = all(
                    t.status in TERMINAL
                    for t in self.tracked
                    if t.job_id and t.planned.expect_resolution in ("direct", "alias")
                )
                if settled and not simulator.busy:
                    break
                await asyncio.sleep(0.2 if self.console.is_terminal else 0.5)
            await simulator.idle()

    def _progress_line(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tracked:
            if t.job_id:
                counts[t.status] = counts.get(t.status, 0) + 1
        parts = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
        return f"progress: {parts}"

    async def _refresh(self, http: aiohttp.ClientSession) -> None:
        async def one(t: Tracked) -> None:
            if t.job_id is None:
                return
            async with http.get(
                f"/api/{t.planned.kind}s/{t.job_id}/status", headers=self._auth(t.planned.user)
            ) as resp:
                if resp.status == 200:
                    status = await resp.json()
                    t.status, t.progress = status["status"], status["progress"]

        await asyncio.gather(*(one(t) for t in self.tracked))

    def _table(self) -> Table:
        table = Table(title="jobs")
        for column in ("user", "kind", "backend behaviour", "status", "progress"):
            table.add_column(column)
        for t in self.tracked:
            bar = "#" * (t.progress // 10) + "." * (10 - t.progress // 10)
            table.add_row(t.planned.user, t.planned.kind, t.planned.mode, t.status,
                          f"{bar} {t.progress:3d}%")
        return table

    async def _reconcile(self, dsn: str) -> dict[str, Any]:
        """One pass of the operator's command, as a schedule would run it."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reconcile", "run", "--grace", "0", "--json",
            env={**os.environ, "DATABASE_URL": dsn, "LOG_LEVEL": "warning"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"sorami-reconcile exited {proc.returncode}: {err.decode()}")
        result: dict[str, Any] = json.loads(out)
        return result

    def _report(self, findings: Findings, reconcile: dict[str, Any], elapsed: float) -> None:
        table = Table(title="how each job ended")
        for column in ("job", "user", "kind", "status", "files", "resolved"):
            table.add_column(column)
        for t in self.tracked:
            key = t.job_id or t.backend_id or ""
            label = key[:8] if t.job_id else f"backend:{key[:8]}"
            table.add_row(label, t.planned.user, t.planned.kind, t.status,
                          str(findings.files.get(key, 0)), findings.resolution.get(key, "?"))
        self.console.print(table)
        counts = reconcile.get("counts", reconcile)
        self.console.print(f"reconcile pass: {json.dumps(counts, sort_keys=True)}")
        for review in findings.reviews:
            self.console.print(f"  needs review: {review}")
        for check in findings.checks:
            mark = "[green]held[/]" if check.held else "[red]FAILED[/]"
            self.console.print(f"{mark}  {check.name}: {check.detail}")
        verdict = (
            "every invariant held"
            if all(c.held for c in findings.checks)
            else "an invariant did not hold"
        )
        self.console.print(f"[bold]{verdict}[/] in {elapsed:.1f} s")


class Invariants:
    """What the gateway promises, checked against the database and the backend's records."""

    def __init__(
        self, conn: asyncpg.Connection, tracked: list[Tracked], simulator: SimulatedBackend
    ) -> None:
        self.conn = conn
        self.tracked = tracked
        self.simulator = simulator

    async def findings(self) -> Findings:
        jobs = {
            r["id"]: r
            for r in await self.conn.fetch(
                """
                SELECT j.id, j.user_id, j.status, a.source AS alias_source,
                       (SELECT count(*) FROM job_files f WHERE f.job_id = j.id) AS files,
                       EXISTS (SELECT 1 FROM webhook_deliveries d
                               WHERE d.job_id = j.id AND d.backend_job_id = j.id) AS direct
                FROM jobs j LEFT JOIN job_aliases a ON a.job_id = j.id
                """
            )
        }
        orphans = await self.conn.fetch(
            """
            SELECT o.backend_job_id, o.kind, o.user_id, o.prompt, d.outcome, d.rule
            FROM orphans o
            LEFT JOIN LATERAL (
                SELECT outcome, rule FROM reconcile_decisions r
                WHERE r.kind = o.kind AND r.backend_job_id = o.backend_job_id
                ORDER BY r.id DESC LIMIT 1) d ON true
            WHERE o.state IN ('unresolved', 'unmatched')
            """
        )
        resolution = {job_id: self._resolution(row) for job_id, row in jobs.items()}
        for orphan in orphans:
            resolution[orphan["backend_job_id"]] = "needs review"
        reviews = [
            f"{o['kind']} {o['backend_job_id'][:8]} (user {o['user_id'] or 'unknown'}, "
            f"prompt {o['prompt']!r}): {o['outcome'] or 'not looked at'} by rule {o['rule']}"
            for o in orphans
        ]
        checks = [
            await self._files_on_owners_jobs(),
            await self._no_duplicate_effect(jobs),
            await self._nothing_lost(jobs),
            self._as_expected(jobs, resolution),
            self._reviews_explained(orphans),
        ]
        files = {job_id: row["files"] for job_id, row in jobs.items()}
        return Findings(files, resolution, reviews, checks)

    @staticmethod
    def _resolution(row: asyncpg.Record) -> str:
        if row["alias_source"] == "reconciler":
            return "reconciled"
        if row["alias_source"] == "operator":
            return "assigned"
        if row["alias_source"] == "delivery":
            return "alias"
        if row["direct"]:
            return "direct"
        return "needs review"

    async def _files_on_owners_jobs(self) -> Check:
        rows = await self.conn.fetch(
            "SELECT f.url, j.user_id FROM job_files f JOIN jobs j ON j.id = f.job_id"
        )
        wrong = []
        for row in rows:
            backend_id = urlsplit(row["url"]).path.split("/")[2]
            sim_job = self.simulator.jobs.get(backend_id)
            if sim_job is None or sim_job.user_id != row["user_id"]:
                wrong.append(row["url"])
        return Check(
            "every file on its owner's job",
            not wrong and bool(rows),
            f"{len(rows)} files, each traced to the backend job its owner asked for"
            if not wrong
            else f"{len(wrong)} files on another user's job: {wrong[:3]}",
        )

    async def _no_duplicate_effect(self, jobs: dict[str, asyncpg.Record]) -> Check:
        notes = await self.conn.fetch("SELECT job_id, type FROM notifications")
        per_job: dict[str, list[str]] = {}
        for n in notes:
            per_job.setdefault(n["job_id"], []).append(n["type"])
        problems = []
        for job_id, row in jobs.items():
            types = per_job.get(job_id, [])
            if row["status"] == "COMPLETED" and (row["files"] != 1 or len(types) != 1):
                problems.append(f"{job_id[:8]}: {row['files']} files, {types}")
            if row["status"] == "FAILED" and (row["files"] != 0 or len(types) != 1):
                problems.append(f"{job_id[:8]}: {row['files']} files, {types}")
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

    async def _nothing_lost(self, jobs: dict[str, asyncpg.Record]) -> Check:
        sent = self.simulator.sent
        refused = [s for s in sent if s.http_status is None or s.http_status >= 300]
        recorded = await self.conn.fetchval("SELECT count(*) FROM webhook_deliveries")
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

    def _as_expected(self, jobs: dict[str, asyncpg.Record], resolution: dict[str, str]) -> Check:
        wrong = []
        for t in self.tracked:
            key = t.job_id or t.backend_id or ""
            status = jobs[key]["status"] if key in jobs else "-"
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
    def _reviews_explained(orphans: list[asyncpg.Record]) -> Check:
        unexplained = [o["backend_job_id"] for o in orphans
                       if o["outcome"] not in ("ambiguous", "no_candidate")]
        return Check(
            "review items explained",
            not unexplained,
            f"{len(orphans)} orphans left to a person, each with the rule that stopped it"
            if not unexplained
            else f"{len(unexplained)} orphans without a decision",
        )


def run(data_dir: Path, jobs: int, fast: bool) -> int:
    """Run the demo on the embedded PostgreSQL of `data_dir`; 0 when every invariant held."""
    plain = Console()
    # without a terminal (CI, a pipe) rich would wrap at 80 columns
    console = plain if plain.is_terminal else Console(width=120)
    with embedded_postgres(data_dir) as admin_dsn:
        dsn = asyncio.run(fresh_database(admin_dsn))
        return asyncio.run(Demo(console, jobs, fast).run(dsn))
