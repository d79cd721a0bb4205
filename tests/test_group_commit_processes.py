"""Group commit across `serve` processes: two processes' batches that deadlock on one
database are told apart by PostgreSQL, the victim's batch runs again, and every delivery is
answered once, with what it did."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from gateway.jobs.kinds import Kind
from gateway.store import Database
from tests.conftest import WEBHOOK_KEY
from tests.metrics_helpers import Scrape
from tests.signing import signed
from tests.test_group_commit import (
    CROSSED,
    check_crossed,
    cross,
    crossed_jobs,
    crossing,
    waiting_for_locks,
)
from tests.test_limits_processes import replicas
from tests.test_webhooks_ingest import ROUTES, completed


async def post(session: aiohttp.ClientSession, base: str, payload: dict[str, Any],
               msg_id: str) -> tuple[int, str]:
    body, headers = signed(payload, WEBHOOK_KEY, msg_id)
    async with session.post(base + ROUTES[Kind.IMAGE], data=body, headers=headers) as resp:
        return resp.status, (await resp.json())["outcome"]


async def scrape(session: aiohttp.ClientSession, base: str) -> Scrape:
    async with session.get(f"{base}/metrics") as resp:
        return Scrape(await resp.text())


async def queued(session: aiohttp.ClientSession, base: str, count: int) -> None:
    """Until `count` webhooks wait in the process's stage for a transaction."""
    for _ in range(500):
        if (await scrape(session, base)).get("sorami_batch_queued", stage="webhook") >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} webhooks never queued at {base}")


async def test_a_deadlock_between_two_serve_processes_batches_is_retried_and_answered_once(
    db: Database, database_url: str
) -> None:
    plugs = await crossed_jobs(db)
    # one transaction in flight per process: what arrives behind it waits for the next
    async with replicas(database_url, 2, BATCH_IN_FLIGHT="1") as bases, \
            aiohttp.ClientSession() as session:
        async with crossing(database_url) as blocker:
            await blocker.execute("SAVEPOINT plugs")
            await blocker.execute("SELECT 1 FROM jobs WHERE id LIKE 'plug-%' FOR UPDATE")
            plugged = [asyncio.ensure_future(post(session, base, completed(plug), plug))
                       for base, plug in zip(bases, plugs, strict=True)]
            await waiting_for_locks(db, 2)
            answers = [asyncio.ensure_future(post(session, base, payload, msg_id))
                       for base, side in zip(bases, CROSSED, strict=True)
                       for payload, msg_id in side]
            await asyncio.gather(*(queued(session, base, 2) for base in bases))
            # the plugs commit; each process's batch of two then comes to its first row
            await blocker.execute("ROLLBACK TO SAVEPOINT plugs")
            assert await asyncio.gather(*plugged) == [(200, "applied")] * 2
            await cross(db, blocker)
        # the blocker is gone: each batch holds the row the other wants
        results = await asyncio.gather(*answers)
        scrapes = [await scrape(session, base) for base in bases]

    assert [status for status, _ in results] == [200] * 4
    outcomes = [outcome for _, outcome in results]
    # each process ran its plug alone, then its two webhooks as one batch
    for found in scrapes:
        assert found.get("sorami_batch_size_count", stage="webhook") == 2
        assert found.get("sorami_batch_size_sum", stage="webhook") == 3
        assert found.get("sorami_batch_items_alone_total", stage="webhook") == 0
    # PostgreSQL chose one victim; its batch ran again once the other had committed
    assert sum(found.get("sorami_batch_retries_total", stage="webhook")
               for found in scrapes) == 1
    await check_crossed(db, outcomes)
