"""The pool wrapper: borrowers are served in the order they asked, whatever asks meanwhile."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from gateway.store.database import Database


async def _queued(db: Database, waiting: int) -> None:
    """Until `waiting` borrowers wait, for a turn or in the pool itself (nothing public says
    how many wait: the queues' own lengths)."""
    for _ in range(1000):
        turns = len(db._turns._waiters or ())
        if turns + len(db.pool._queue._getters) >= waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{waiting} borrowers never queued")


async def test_a_borrower_that_returns_a_connection_and_asks_again_waits_its_turn(
    database_url: str,
) -> None:
    db = await Database.open(database_url, min_size=1, max_size=1)
    order: list[str] = []
    go = asyncio.Event()

    async def holder() -> None:
        async with db.connection():
            order.append("first")
            await go.wait()
        # straight back for another, as a busy handler would: the two that queued come first
        async with db.connection() as conn:
            order.append("first again")
            assert await conn.fetchval("SELECT 1") == 1

    async def borrower(name: str) -> None:
        async with db.connection() as conn:
            order.append(name)
            assert await conn.fetchval("SELECT 1") == 1

    try:
        first = asyncio.create_task(holder())
        # the holder has the pool's one connection
        await asyncio.sleep(0)
        assert order == ["first"]
        others = [asyncio.create_task(borrower("a"))]
        await _queued(db, 1)
        others.append(asyncio.create_task(borrower("b")))
        await _queued(db, 2)
        go.set()
        await asyncio.wait_for(asyncio.gather(first, *others), 10)
        assert order == ["first", "a", "b", "first again"]
    finally:
        await db.close()


async def test_a_borrower_cancelled_while_waiting_gives_up_its_turn(database_url: str) -> None:
    db = await Database.open(database_url, min_size=1, max_size=1)
    release = asyncio.Event()
    served: list[str] = []

    async def hold() -> None:
        async with db.connection():
            await release.wait()

    async def borrow(name: str) -> None:
        async with db.connection() as conn:
            served.append(name)
            await conn.fetchval("SELECT 1")

    try:
        holding = asyncio.create_task(hold())
        await asyncio.sleep(0)
        gone = asyncio.create_task(borrow("cancelled"))
        await _queued(db, 1)
        later = asyncio.create_task(borrow("later"))
        await _queued(db, 2)
        gone.cancel()
        release.set()
        await asyncio.wait_for(asyncio.gather(holding, later), 10)
        assert gone.cancelled()
        assert served == ["later"]
        # every turn came back: the pool's one connection can be borrowed again at once
        async with asyncio.timeout(5), db.connection() as conn:
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await db.close()


async def test_the_pool_never_makes_a_borrower_wait_behind_the_gate(database_url: str) -> None:
    """With as many turns as connections, a borrower let through finds a connection free:
    the pool's own (unordered) queue is never used."""
    db = await Database.open(database_url, min_size=2, max_size=2)
    waited: list[bool] = []
    original = asyncpg.pool.Pool.acquire

    def acquire(pool: asyncpg.Pool, *args: object, **kwargs: object) -> object:
        waited.append(pool._queue.empty())  # no free connection: the borrower would wait
        return original(pool, *args, **kwargs)

    async def borrow() -> None:
        async with db.connection() as conn:
            await conn.fetchval("SELECT pg_sleep(0.01)")

    try:
        asyncpg.pool.Pool.acquire = acquire  # type: ignore[method-assign]
        await asyncio.wait_for(asyncio.gather(*(borrow() for _ in range(20))), 20)
    finally:
        asyncpg.pool.Pool.acquire = original  # type: ignore[method-assign]
        await db.close()
    assert len(waited) == 20
    assert not any(waited)


async def test_close_does_not_wait_forever_for_a_borrowed_connection(database_url: str) -> None:
    db = await Database.open(database_url, min_size=1, max_size=1)
    borrowed = asyncio.Event()
    never = asyncio.Event()

    async def hold() -> None:
        async with db.connection():
            borrowed.set()
            await never.wait()

    holding = asyncio.create_task(hold())
    await borrowed.wait()
    try:
        await asyncio.wait_for(db.close(seconds=0.2), 5)
        assert db.pool._closed  # terminated: nothing left open
    finally:
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await holding
