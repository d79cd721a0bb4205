"""Per-user limits hold across replicas: `serve` processes on one database, and the
operator's overrides set with `sorami-gateway limits` apply on all of them at once."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest

from gateway.jobs.kinds import Kind
from gateway.store import Database
from tests.backend import ScriptedBackend, eventually
from tests.conftest import WEBHOOK_KEY
from tests.factories import insert_job
from tests.procs import Proc, clean_env, free_port, serve_env, start, wait_ready
from tests.signing import signed
from tests.test_webhooks_ingest import ROUTES, completed
from tests.tokens import user

REPLICAS = 3
CREATES = 100


@contextlib.asynccontextmanager
async def replicas(database_url: str, count: int = REPLICAS,
                   **env: str) -> AsyncIterator[list[str]]:
    """The base URLs of `count` gateways on `database_url` with `env`; stopped afterwards."""
    procs: list[Proc] = []
    ports = [free_port() for _ in range(count)]
    try:
        for port in ports:
            procs.append(start(["serve", "--no-migrate"],
                               serve_env(database_url, PORT=str(port), **env)))
        await asyncio.gather(*(wait_ready(port, timeout=30) for port in ports))
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            code, stderr = proc.stop()
            assert code == 0, stderr[-2000:]


async def create(session: aiohttp.ClientSession, base: str, sub: str) -> tuple[int, dict[str, str],
                                                                                 dict[str, object]]:
    async with session.post(f"{base}/api/images/generate", json={"prompt": "a red kite"},
                            headers=user(sub)) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def burst(session: aiohttp.ClientSession, bases: Sequence[str], sub: str,
                other: str) -> tuple[list[tuple[int, dict[str, str], dict[str, object]]],
                                     tuple[int, dict[str, str], dict[str, object]]]:
    """CREATES concurrent creates by `sub` spread over the replicas, and meanwhile one by
    `other`."""
    answers = await asyncio.gather(
        create(session, bases[REPLICAS - 1], other),
        *(create(session, bases[n % REPLICAS], sub) for n in range(CREATES)),
    )
    return list(answers[1:]), answers[0]


@pytest.mark.reliability
async def test_the_active_limit_holds_exactly_across_three_replicas(
    database_url: str, db: Database
) -> None:
    async with (replicas(database_url, USER_MAX_ACTIVE_IMAGE_JOBS="5") as bases,
                aiohttp.ClientSession() as session):
        answers, other = await burst(session, bases, "burst", "other")
        accepted = [body for status, _, body in answers if status == 202]
        refused = [(headers, body) for status, headers, body in answers if status == 429]
        assert len(accepted) == 5
        assert len(refused) == CREATES - 5
        for headers, body in refused:
            assert headers["Retry-After"] == "5"
            assert body["limit"] == "USER_MAX_ACTIVE_IMAGE_JOBS"
            assert body["value"] == 5
        assert other[0] == 202
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE user_id = 'burst'") == 5

        # one of the five completes by webhook (on another replica): one more fits
        payload, headers = signed(completed(str(accepted[0]["job_id"])), WEBHOOK_KEY, "m1")
        async with session.post(bases[1] + ROUTES[Kind.IMAGE], data=payload,
                                headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        assert (await create(session, bases[2], "burst"))[0] == 202
        assert (await create(session, bases[0], "burst"))[0] == 429


@pytest.mark.reliability
async def test_the_hourly_limit_holds_exactly_across_three_replicas(
    database_url: str, db: Database
) -> None:
    # created 20 minutes ago: it leaves the window in 40 minutes
    await insert_job(db, user_id="burst", created_ago_seconds=1200)
    async with (replicas(database_url, USER_MAX_ACTIVE_IMAGE_JOBS="0",
                         USER_MAX_IMAGE_JOBS_PER_HOUR="5") as bases,
                aiohttp.ClientSession() as session):
        answers, other = await burst(session, bases, "burst", "other")
    statuses = [status for status, _, _ in answers]
    assert statuses.count(202) == 4
    assert statuses.count(429) == CREATES - 4
    for status, headers, body in answers:
        if status == 429:
            assert body["limit"] == "USER_MAX_IMAGE_JOBS_PER_HOUR"
            assert 2390 <= int(headers["Retry-After"]) <= 2400
            assert headers["RateLimit"].startswith('"images-hour";r=0;t=')
    assert other[0] == 202
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE user_id = 'burst'") == 5


def limits_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "limits", *args],
        env=clean_env(DATABASE_URL=database_url, USER_MAX_ACTIVE_IMAGE_JOBS="1"),
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.reliability
async def test_an_override_set_from_the_cli_applies_on_every_replica_at_the_next_request(
    database_url: str, db: Database
) -> None:
    async with (replicas(database_url, 2, USER_MAX_ACTIVE_IMAGE_JOBS="1") as (one, two),
                aiohttp.ClientSession() as session):
        assert (await create(session, one, "u1"))[0] == 202
        assert (await create(session, two, "u1"))[0] == 429

        done = limits_cli(database_url, "set", "--user", "u1", "--active-images", "2",
                          "--by", "ops@example")
        assert done.returncode == 0, done.stderr
        assert "override" in done.stdout
        status, headers, _ = await create(session, two, "u1")
        assert status == 202
        assert headers["RateLimit-Policy"].endswith('"images-active";q=2')
        assert (await create(session, one, "u1"))[0] == 429

        shown = limits_cli(database_url, "show", "--user", "u1")
        assert shown.returncode == 0, shown.stderr
        assert "active_images" in shown.stdout
        assert "set by ops@example" in shown.stdout

        done = limits_cli(database_url, "reset", "--user", "u1", "--by", "ops@example")
        assert done.returncode == 0, done.stderr
        assert "default USER_MAX_ACTIVE_IMAGE_JOBS" in done.stdout
        # two active now, the default 1 again
        assert (await create(session, one, "u1"))[0] == 429
    changes = await db.fetch("SELECT action, changed_by FROM user_limit_changes ORDER BY id")
    assert [(c["action"], c["changed_by"]) for c in changes] == [
        ("set", "ops@example"), ("reset", "ops@example")]


async def test_the_limits_cli_refuses_bad_input_and_writes_nothing(
    database_url: str, db: Database
) -> None:
    negative = limits_cli(database_url, "set", "--user", "u1", "--active-images", "-1")
    assert negative.returncode == 2
    assert "--active-images" in negative.stderr
    assert "0 or more" in negative.stderr
    nothing = limits_cli(database_url, "set", "--user", "u1")
    assert nothing.returncode == 1
    assert "at least one of" in nothing.stderr
    assert limits_cli(database_url, "show").returncode == 2  # --user is required
    assert await db.fetchval("SELECT count(*) FROM user_limits") == 0
    assert await db.fetchval("SELECT count(*) FROM user_limit_changes") == 0


@pytest.mark.reliability
async def test_the_backend_in_flight_cap_holds_across_three_replicas(
    database_url: str, db: Database, aiohttp_server: Any
) -> None:
    backend = ScriptedBackend()  # accepts every job and never sends a webhook
    await backend.start(aiohttp_server)
    async with (replicas(database_url, BACKEND_URL=backend.url, USER_MAX_ACTIVE_IMAGE_JOBS="0",
                         BACKEND_MAX_IN_FLIGHT_IMAGE_JOBS="2") as bases,
                aiohttp.ClientSession() as session):
        answers = await asyncio.gather(
            *(create(session, bases[n % REPLICAS], f"user_{n % 4}") for n in range(12)))
        assert [status for status, _, _ in answers] == [202] * 12
        await eventually(lambda: _accepted(backend, 2), timeout=15, every=0.05)
        await asyncio.sleep(3)  # more than a poll of every replica: nothing more goes
        assert len(backend.accepted) == 2

        payload, headers = signed(completed(next(iter(backend.accepted))), WEBHOOK_KEY, "m2")
        async with session.post(bases[2] + ROUTES[Kind.IMAGE], data=payload,
                                headers=headers) as resp:
            assert resp.status == 200
        await eventually(lambda: _accepted(backend, 3), timeout=15, every=0.05)
        await asyncio.sleep(3)
        assert len(backend.accepted) == 3
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE due_at = 'infinity'") == 9


async def _accepted(backend: ScriptedBackend, count: int) -> bool:
    return len(backend.accepted) >= count
