"""The demo's run and its terminal: the gateway and the simulated backend served on free
local ports, the jobs submitted and watched live, one reconcile pass, the report."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gateway.app import create_app
from gateway.demo.invariants import Findings, Invariants
from gateway.demo.scenario import USERS, Tracked, plan
from gateway.embedded import new_webhook_secret
from gateway.jobs.state import TERMINAL
from gateway.settings import Secret, Settings
from gateway.simulator import SimulatedBackend, SimulatorConfig, parse_mode
from gateway.store.database import connect


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
            # `--jobs N` submits them all at once: the per-user limits would refuse some
            user_max_active_image_jobs=0,
            user_max_active_video_jobs=0,
            user_max_image_jobs_per_hour=0,
            user_max_video_jobs_per_hour=0,
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
        conn = await connect(dsn)
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
