"""The usage changes no create folds (limits off, a user who stopped creating, a kind without
limits) are folded by the reconciler's retention step: the table empties and every usage row
stays what counting the jobs gives, with creates, job ends and folds running at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.settings import Settings
from gateway.store import Database, retention
from tests.factories import insert_job
from tests.test_api_jobs import create
from tests.test_limits import (
    IMAGE,
    _remaining,
    limited_client,
    two_more_creates_count_them,
    write_past_the_create,
)
from tests.test_limits_processes import create as create_on
from tests.test_limits_processes import replicas
from tests.tokens import user

TERMINAL = "('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT')"


async def changes(db: Database) -> int:
    value: int = await db.fetchval("SELECT count(*) FROM job_usage_changes")
    return value


async def fold(database_url: str, pairs: int = 100) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return (await retention.fold_usage(conn, pairs=pairs))["job_usage_changes"]
    finally:
        await conn.close()


async def usage_against_the_jobs(db: Database) -> list[tuple[Any, ...]]:
    """Each usage row beside what counting the jobs gives for it."""
    rows = await db.fetch(f"""
        SELECT u.user_id, u.kind, u.active, u.in_window,
               (SELECT count(*) FROM jobs j WHERE j.user_id = u.user_id AND j.kind = u.kind
                  AND j.status NOT IN {TERMINAL}) AS counted_active,
               (SELECT count(*) FROM jobs j WHERE j.user_id = u.user_id AND j.kind = u.kind
                  AND j.created_at > u.window_from) AS counted_in_window
        FROM job_usage u ORDER BY u.user_id, u.kind""")
    return [tuple(r) for r in rows]


def exact(rows: list[tuple[Any, ...]]) -> bool:
    return all(active == counted_active and in_window == counted_in_window
               for _, _, active, in_window, counted_active, counted_in_window in rows)


async def test_a_fold_adds_the_changes_to_the_usage_row_as_a_create_would(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database,
    database_url: str
) -> None:
    client = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=100,
                                  user_max_image_jobs_per_hour=100)
    assert (await create(client, "images", IMAGE)).status == 202
    await write_past_the_create(db)
    pending = await changes(db)
    assert pending > 0

    assert await fold(database_url) == pending
    assert await changes(db) == 0
    assert exact(rows := await usage_against_the_jobs(db)), rows

    # the next creates read the folded row: the same figures as without the fold
    await two_more_creates_count_them(client)
    assert await fold(database_url) == 0


async def test_with_the_limits_off_the_changes_go_and_a_first_limited_create_counts_the_jobs(
    make_settings: Callable[..., Settings], aiohttp_client: Any, db: Database,
    database_url: str
) -> None:
    off = await limited_client(make_settings, aiohttp_client)
    made = [await (await create(off, "images", IMAGE)).json() for _ in range(3)]
    assert (await off.post(f"/api/images/{made[0]['job_id']}/cancel",
                           headers=user("user_a"))).status == 200
    # three inserts and an end, that no create under a limit will fold
    assert await changes(db) == 4

    assert await fold(database_url) == 4
    assert await changes(db) == 0
    assert await db.fetchval("SELECT count(*) FROM job_usage") == 0

    limited = await limited_client(make_settings, aiohttp_client, user_max_active_image_jobs=10)
    assert _remaining(await create(limited, "images", IMAGE)) == {"images-active": 10 - 2 - 1}


async def test_a_user_whose_create_holds_the_lock_is_left_to_it_and_the_pass_ends(
    db: Database, database_url: str
) -> None:
    for sub in ("user_a", "user_b", "user_c"):
        await insert_job(db, user_id=sub)
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            # what a create of user_b's images takes
            await holder.execute("SELECT pg_advisory_xact_lock(21324, hashtext('user_b:image'))")
            # one user per transaction: the pass walks on past the busy one
            assert await fold(database_url, pairs=1) == 2
        left = await db.fetch("SELECT user_id FROM job_usage_changes")
        assert [r["user_id"] for r in left] == ["user_b"]
    finally:
        await holder.close()
    assert await fold(database_url, pairs=1) == 1
    assert await changes(db) == 0


async def test_a_dry_run_counts_the_changes_and_folds_none(
    db: Database, database_url: str
) -> None:
    await insert_job(db)
    conn = await asyncpg.connect(database_url)
    try:
        assert await retention.count_usage_changes(conn) == {"job_usage_changes": 1}
    finally:
        await conn.close()
    assert await changes(db) == 1


@contextlib.asynccontextmanager
async def ending_jobs(db: Database) -> AsyncIterator[list[int]]:
    """Ends the oldest open job again and again (as webhooks do), until the block ends."""
    ended = [0]
    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            status = await db.execute(f"""
                UPDATE jobs SET status = 'COMPLETED', finished_at = now()
                WHERE id = (SELECT id FROM jobs WHERE status NOT IN {TERMINAL}
                            ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)""")
            ended[0] += status == "UPDATE 1"
            await asyncio.sleep(0.005)

    task = asyncio.create_task(run())
    try:
        yield ended
    finally:
        stop.set()
        await task


@pytest.mark.reliability
async def test_creates_on_three_replicas_job_ends_and_two_folders_at_once_keep_usage_exact(
    db: Database, database_url: str
) -> None:
    users = [f"u{n}" for n in range(6)]
    # half the users already have a usage row, half not: both kinds of fold run
    async with (replicas(database_url, USER_MAX_ACTIVE_IMAGE_JOBS="1000",
                         USER_MAX_IMAGE_JOBS_PER_HOUR="1000") as bases,
                aiohttp.ClientSession() as session):
        for sub in users[:3]:
            assert (await create_on(session, bases[0], sub))[0] == 202
        for sub in users[3:]:
            await insert_job(db, user_id=sub)
        stop = asyncio.Event()
        folded = [0]

        async def folder() -> None:
            while not stop.is_set():
                folded[0] += await fold(database_url, pairs=2)

        folders = [asyncio.create_task(folder()) for _ in range(2)]
        async with ending_jobs(db) as ended:
            answers = await asyncio.gather(*(
                create_on(session, bases[n % len(bases)], users[n % 3])
                for n in range(240)))
        stop.set()
        await asyncio.gather(*folders)
        assert [status for status, _, _ in answers] == [202] * 240
        assert ended[0] > 0
        assert folded[0] > 0

        await fold(database_url)
        assert await changes(db) == 0
        rows = await usage_against_the_jobs(db)
        assert [r[0] for r in rows] == users[:3]
        assert exact(rows), rows
        # a first create of a user without a row counts from the jobs
        status, headers, _ = await create_on(session, bases[1], users[3])
        assert status == 202
        open_jobs = await db.fetchval(
            f"SELECT count(*) FROM jobs WHERE user_id = $1 AND status NOT IN {TERMINAL}",
            users[3])
        assert f'"images-active";r={1000 - open_jobs}' in headers["RateLimit"]
