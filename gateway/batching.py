"""Group commit: requests that arrive while a transaction is in flight go together in the
next one.

A stage runs one kind of work (webhook deliveries, job creations). A request submits its
item and waits for its own outcome. While fewer than `in_flight` transactions of the stage
are running, the items queued so far (up to `max_items`) start one at once; otherwise they
wait for one to end. No timer: an idle gateway sends a lone item at once, the way it would
without the stage, and a busy one commits many per transaction — one WAL flush, one turn
at the NOTIFY lock, instead of one each.

What a batch may do is the stage's `many` function: it runs every item in one transaction
and returns each item's outcome (or leaves an item to be run alone after the commit), or
raises for the batch as a whole. Nothing is answered
before its transaction committed. A batch that fails (a deadlock or serialization failure
after its retries, one item's error, the connection lost) is run again item by item
through `one`, the path each item takes without the stage, so an item with a problem of
its own gets the answer it gets today and the others are not held to it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import asyncpg
import structlog
from aiohttp import web

from gateway import keys, metrics
from gateway.database import get_database
from gateway.store import Database

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# a deadlock between two batches, or a serialization failure: the batch is tried again
_CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
CONFLICT_RETRIES = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Stage(Generic[T, R]):
    name: str
    # every item in one transaction on `conn`, each item's outcome in order; None for an
    # item the batch left alone (nothing written): it is run through `one` after the commit
    many: Callable[[asyncpg.Connection, Sequence[T]], Awaitable[list[R | None]]]
    # one item alone, as without the stage (its own connection and transaction)
    one: Callable[[T], Awaitable[R]]


class GroupCommit(Generic[T, R]):
    """One stage's queue and its transactions in flight, in one process."""

    def __init__(
        self, db: Database, stage: Stage[T, R], *, max_items: int, in_flight: int
    ) -> None:
        if max_items < 1 or in_flight < 1:
            raise ValueError("a batch holds at least one item, and one may be in flight")
        self._db = db
        self._stage = stage
        self._max_items = max_items
        self._in_flight = in_flight
        self._queued: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._sizes = metrics.BATCH_SIZE.labels(stage.name)
        self._waiting = metrics.BATCH_QUEUED.labels(stage.name)
        self._commit_seconds = metrics.BATCH_COMMIT.labels(stage.name)
        self._retries = metrics.BATCH_RETRIES.labels(stage.name)
        self._singled = metrics.BATCH_ITEM_BY_ITEM.labels(stage.name)

    async def submit(self, item: T) -> R:
        """`item`'s outcome, once the transaction that holds it committed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        self._waiting.inc()
        self._start()
        # a request given up on still has its item run: the outcome is the item's, not the
        # request's, and the sender's retry then finds it done
        return await asyncio.shield(future)

    def _start(self) -> None:
        while self._queued and self._running < self._in_flight:
            size = min(len(self._queued), self._max_items)
            batch = [self._queued.popleft() for _ in range(size)]
            self._waiting.dec(size)
            self._running += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            self._sizes.observe(len(batch))
            items = [item for item, _ in batch]
            if len(items) == 1:
                await self._settle(batch[0][1], self._stage.one(items[0]))
                return
            try:
                outcomes = await self._together(items)
            except Exception as exc:
                self._singled.inc(len(items))
                log.warning("batch_item_by_item", stage=self._stage.name, items=len(items),
                            error=type(exc).__name__)
                await asyncio.gather(*(self._settle(f, self._stage.one(i)) for i, f in batch))
                return
            alone = []
            for (item, future), outcome in zip(batch, outcomes, strict=True):
                if outcome is None:
                    alone.append(self._settle(future, self._stage.one(item)))
                elif not future.done():
                    future.set_result(outcome)
            await asyncio.gather(*alone)
        finally:
            self._running -= 1
            self._start()

    async def _together(self, items: list[T]) -> list[R | None]:
        for attempt in range(CONFLICT_RETRIES + 1):
            started = time.perf_counter()
            async with self._db.connection() as conn:
                try:
                    outcomes = await self._stage.many(conn, items)
                except _CONFLICTS:
                    # rolled back; asked here, before the pool's errors are translated
                    if attempt == CONFLICT_RETRIES:
                        raise
                    self._retries.inc()
                    continue
            self._commit_seconds.observe(time.perf_counter() - started)
            return outcomes
        raise AssertionError("unreachable")

    @staticmethod
    async def _settle(future: asyncio.Future[R], outcome: Awaitable[R]) -> None:
        try:
            result = await outcome
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    async def close(self) -> None:
        """Wait for the batches in flight (their requests are waiting for them)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def setup_group_commit(
    app: web.Application,
    key: web.AppKey[GroupCommit[T, R]],
    name: str,
    many: Callable[[asyncpg.Connection, Sequence[T]], Awaitable[list[R | None]]],
    one: Callable[[Database, T], Awaitable[R]],
    max_items: int,
) -> None:
    """The stage `name` as an application resource under `key`, unless `max_items` (a
    setting) turns it off (0 or 1): requests then run `one` themselves, as without it."""
    if max_items <= 1:
        return

    async def group_commit_ctx(app: web.Application) -> AsyncIterator[None]:
        db = get_database(app)

        async def alone(item: T) -> R:
            return await one(db, item)

        batches = GroupCommit(db, Stage(name, many, alone), max_items=max_items,
                              in_flight=app[keys.SETTINGS].batch_in_flight)
        app[key] = batches
        try:
            yield
        finally:
            await batches.close()

    app.cleanup_ctx.append(group_commit_ctx)
