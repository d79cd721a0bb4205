"""The hub's shared reads: the subscribers of a job woken together share one read, and a
subscriber woken after a read began never takes that read's (possibly older) rows."""

from __future__ import annotations

import asyncio

import pytest

from gateway.events import JobEventHub


def _hub() -> JobEventHub:
    # never started: the tests drive its notification handling directly
    return JobEventHub("postgresql://unused@127.0.0.1:1/none")


async def test_subscribers_woken_by_one_notification_share_one_read() -> None:
    hub = _hub()
    reads = 0
    release = asyncio.Event()

    async def read() -> list[int]:
        nonlocal reads
        reads += 1
        await release.wait()
        return [7]

    with hub.subscribe("job-1") as first, hub.subscribe("job-1") as second:
        hub._on_payload("job-1:7")
        waiters = [
            asyncio.create_task(hub.shared("job-1", 6, s.generation, read))
            for s in (first, second)
        ]
        await asyncio.sleep(0)
        release.set()
        assert await asyncio.gather(*waiters) == [[7], [7]]
    assert reads == 1


async def test_a_subscriber_woken_after_a_read_began_reads_again() -> None:
    hub = _hub()
    started: list[int] = []
    under_way = asyncio.Event()
    release = asyncio.Event()

    async def read() -> int:
        generation = hub.generation
        started.append(generation)
        under_way.set()
        await release.wait()
        return generation

    with hub.subscribe("job-1") as early, hub.subscribe("job-1") as late:
        hub._on_payload("job-1:7")
        before = asyncio.create_task(hub.shared("job-1", 6, early.generation, read))
        await under_way.wait()
        hub._on_payload("job-1:8")  # committed after the first read may have looked
        after = asyncio.create_task(hub.shared("job-1", 6, late.generation, read))
        await asyncio.sleep(0)
        release.set()
        assert await before == 1
        assert await after == 2
    assert started == [1, 2]


async def test_a_failed_shared_read_raises_for_every_subscriber_and_is_forgotten() -> None:
    hub = _hub()
    calls = 0

    async def read() -> list[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise ConnectionResetError("database gone")

    with hub.subscribe("job-1") as s:
        hub._on_payload("job-1:2")
        waiters = [asyncio.create_task(hub.shared("job-1", 1, s.generation, read))
                   for _ in range(3)]
        for waiter in waiters:
            with pytest.raises(ConnectionResetError):
                await waiter
        # the next wake reads again rather than reusing the failure
        with pytest.raises(ConnectionResetError):
            await hub.shared("job-1", 1, s.generation, read)
    assert calls == 2


async def test_one_subscriber_leaving_does_not_cancel_the_read_of_the_others() -> None:
    hub = _hub()
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        return "rows"

    with hub.subscribe("job-1") as s:
        hub._on_payload("job-1:2")
        leaving = asyncio.create_task(hub.shared("job-1", 1, s.generation, read))
        staying = asyncio.create_task(hub.shared("job-1", 1, s.generation, read))
        await asyncio.sleep(0)
        leaving.cancel()
        release.set()
        assert await staying == "rows"
