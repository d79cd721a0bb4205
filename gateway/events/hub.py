"""The per-process fan-out of job changes to live subscribers (Server-Sent Events).

One LISTEN connection per process, however many subscribers: a notification
`<job_id>:<seq>` wakes the subscribers of that job, which then read what changed from
`job_events`. When the listening connection drops, the hub reconnects and wakes every
subscriber, so changes committed while nobody was listening are read all the same.

The subscribers of one job, woken by one notification, all ask for the same rows: `shared`
lets them share one read instead of one query each. A read is shared only with subscribers
woken no later than it started (the hub counts notifications in `generation`), so a read
that began before a commit was heard is never taken for one that includes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import structlog

from gateway.store.events import LISTENER_APPLICATION_NAME
from gateway.store.jobs import NOTIFY_CHANNEL
from gateway.store.listen import listen

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Subscription:
    """One subscriber's wake-up call for one job; changes coalesce into one wake."""

    def __init__(self, job_id: str, generation: int = 0) -> None:
        self.job_id = job_id
        self.closed = False
        # the hub's generation when this subscriber was last woken (or subscribed)
        self.generation = generation
        self._woken = asyncio.Event()

    def wake(self, generation: int = 0) -> None:
        self.generation = max(self.generation, generation)
        self._woken.set()

    def close(self) -> None:
        self.closed = True
        self._woken.set()

    async def wait(self, seconds: float) -> bool:
        """True when woken (something may have changed, or the hub closes); False after
        `seconds` of silence."""
        try:
            await asyncio.wait_for(self._woken.wait(), seconds)
        except TimeoutError:
            return False
        self._woken.clear()
        return True


class JobEventHub:
    def __init__(
        self,
        dsn: str,
        *,
        channel: str = NOTIFY_CHANNEL,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 10.0,
        keepalive_seconds: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._keepalive = keepalive_seconds
        self._subscribers: dict[str, set[Subscription]] = {}
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # notifications heard (and reconnections): orders reads against wake-ups
        self._generation = 0
        # (job_id, after seq) -> (generation when the read started, the read)
        self._reads: dict[tuple[str, int], tuple[int, asyncio.Future[Any]]] = {}

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def wait_listening(self, seconds: float = 10.0) -> None:
        await asyncio.wait_for(self._listening.wait(), seconds)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="job-events-listener")

    def close_subscribers(self) -> None:
        """End every live stream (server shutdown): their handlers return promptly."""
        self._closing = True
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.close()

    async def close(self) -> None:
        self.close_subscribers()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def generation(self) -> int:
        return self._generation

    async def shared(
        self, job_id: str, seq: int, woken: int, read: Callable[[], Awaitable[T]]
    ) -> T:
        """`read()` (the job's changes after `seq`), or the same read already under way, when
        that one started at generation `woken` or later: it then sees every commit whose
        notification woke the caller."""
        key = (job_id, seq)
        current = self._reads.get(key)
        if current is None or current[0] < woken:
            future: asyncio.Future[Any] = asyncio.ensure_future(read())
            self._reads[key] = (self._generation, future)
            future.add_done_callback(lambda done: self._forget(key, done))
        else:
            future = current[1]
        # one caller leaving (its client went away) must not cancel the others' read
        result: T = await asyncio.shield(future)
        return result

    def _forget(self, key: tuple[str, int], done: asyncio.Future[Any]) -> None:
        current = self._reads.get(key)
        if current is not None and current[1] is done:
            del self._reads[key]
        if not done.cancelled():
            done.exception()  # retrieved: every caller that still waits gets it raised

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        subscription = Subscription(job_id, self._generation)
        if self._closing:
            subscription.close()
        self._subscribers.setdefault(job_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[job_id]

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def _on_payload(self, payload: str) -> None:
        job_id, _, _seq = payload.rpartition(":")
        self._generation += 1
        for subscription in self._subscribers.get(job_id, ()):
            subscription.wake(self._generation)

    def _wake_all(self) -> None:
        self._generation += 1
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.wake(self._generation)

    def _listening_again(self) -> None:
        self._listening.set()
        # changes committed while nobody listened: every subscriber reads again
        self._wake_all()

    async def _run(self) -> None:
        await listen(
            self._dsn,
            self._channel,
            self._on_payload,
            application_name=LISTENER_APPLICATION_NAME,
            on_listening=self._listening_again,
            on_lost=self._listening.clear,
            keepalive_seconds=self._keepalive,
            reconnect_delay=self._reconnect_delay,
            max_reconnect_delay=self._max_reconnect_delay,
        )
