"""The dispatcher: sends committed outbox rows to the generator backend, once at a time each.

Every server process runs one. It claims due rows under a lease (`store.outbox.claim`, `FOR
UPDATE SKIP LOCKED`), so processes share the outbox and a crashed claimer's rows come back
when its lease ends. It wakes on `LISTEN sorami_outbox` for the first attempt right after
commit and polls as a fallback (retries come due by time; NOTIFYs are lost while the
listener reconnects).

One attempt is a few quick tries (tenacity) within the lease; the lease is sized so that
every try of an attempt ends, and its outcome is written, before the lease can run out: no
second claimer can send the same row while a try is in flight. A try that gets no answer
within the timeout ends its attempt: a hanging backend holds a slot for one timeout, not
for every quick try. Between attempts the row
waits on `DELIVERY_RETRY_SCHEDULE`, with jitter, or longer when `Retry-After` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import asyncpg
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from gateway import metrics
from gateway.delivery.backend import (
    Accepted,
    BackendClient,
    Refused,
    TimedOut,
    Transient,
    Unsendable,
)
from gateway.jobs.kinds import Kind
from gateway.jobs.state import Status
from gateway.settings import Settings
from gateway.store import Database, StoreError, StoreUnavailable, admission, outbox
from gateway.usecases import delivery

log = structlog.get_logger(__name__)

# Tries within one attempt, and the base waits between them.
INLINE_TRIES: Final = 3
INLINE_BACKOFF: Final = (0.1, 0.3)
# A Retry-After up to this is waited out within the attempt; a longer one ends it.
INLINE_MAX_WAIT: Final = 2.0
# A try starts only if it ends this long before the lease does (time to write the outcome).
SETTLE_MARGIN: Final = 5.0
# Lease beyond the tries and waits themselves: claim latency, the outcome's transaction.
LEASE_MARGIN: Final = 10.0
JITTER: Final = 0.2
# Retry-After values beyond this are taken as this (a day): a backend cannot park a job forever.
MAX_RETRY_AFTER: Final = 86_400.0
POLL_SECONDS: Final = 2.0
MIN_SLEEP: Final = 0.02
MAX_IN_FLIGHT: Final = 16
_T = TypeVar("_T")


def lease_seconds(timeout: float) -> float:
    """A lease that outlasts every try of one attempt, the waits between them and the
    outcome's write, so a claim never overlaps the next claimer's sends."""
    return INLINE_TRIES * timeout + (INLINE_TRIES - 1) * INLINE_MAX_WAIT + LEASE_MARGIN


def default_owner() -> str:
    """Names this dispatcher in `lease_owner`: host, pid, and a nonce for restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Dispatcher:
    """Claims due outbox rows and sends each in its own task, at most `max_in_flight`."""

    def __init__(
        self,
        database: Database,
        client: BackendClient,
        settings: Settings,
        *,
        owner: str | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        poll_seconds: float = POLL_SECONDS,
        drain_seconds: float | None = None,
    ) -> None:
        self.database = database
        self.client = client
        self.owner = owner or default_owner()
        self.timeout = settings.backend_timeout_seconds
        self.schedule = settings.delivery_retry_schedule
        self.lease_seconds = lease_seconds(self.timeout)
        self.max_in_flight = max_in_flight
        # BACKEND_MAX_IN_FLIGHT_*: kinds whose generate calls wait to be admitted
        self.caps = {kind: settings.backend_max_in_flight(kind) for kind in Kind}
        # calls left waiting by an earlier configuration of a kind now uncapped: admit once
        self._uncapped_released = False
        self.poll_seconds = poll_seconds
        # an in-flight try ends within its timeout; then its outcome is written
        self.drain_seconds = (
            drain_seconds if drain_seconds is not None else self.timeout + SETTLE_MARGIN
        )
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._attempts: dict[asyncio.Task[None], _Attempt] = {}
        self._main: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._random = random.Random()

    async def start(self) -> None:
        self._listener = asyncio.create_task(
            outbox.listen(self.database.dsn, self._wake.set, stopping=self.stopping),
            name="delivery-listener",
        )
        self._main = asyncio.create_task(self._run(), name="delivery-dispatcher")
        log.info(
            "delivery_started",
            owner=self.owner,
            lease_seconds=self.lease_seconds,
            retry_schedule=list(self.schedule),
        )

    async def stop(self) -> None:
        """Stop claiming, let in-flight sends finish (up to `drain_seconds`), give back
        claims that never started."""
        self.stopping.set()
        self._wake.set()
        if self._main is not None:
            await self._main
        running = dict(self._attempts)
        if running:
            _, late = await asyncio.wait(set(running), timeout=self.drain_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            # cut short before their first call: nothing was sent, the claim is given back
            unstarted = [running[t].row.id for t in late if not running[t].started]
            if unstarted:
                try:
                    async with self.database.connection() as conn:
                        await outbox.release(conn, unstarted, owner=self.owner)
                except StoreError as exc:
                    log.warning("delivery_release_failed", error=str(exc), rows=len(unstarted))
            if late:
                log.warning("delivery_drain_incomplete", cancelled=len(late))
        if self._listener is not None:
            await self._listener
        log.info("delivery_stopped", owner=self.owner)

    async def _run(self) -> None:
        """Supervise the claim loop: an unexpected error is logged and the loop goes on."""
        while not self.stopping.is_set():
            try:
                await self._claim_loop()
            except Exception:
                log.exception("delivery_loop_error")
                await self._sleep(self.poll_seconds)

    async def _claim_loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            self._wake.clear()  # before claiming: a NOTIFY during the claim is not lost
            timeout: float | None = self.poll_seconds
            free = self.max_in_flight - len(self._attempts)
            if free > 0:
                loop = asyncio.get_running_loop()
                claimed_at = loop.time()
                try:
                    async with self.database.connection() as conn:
                        await self._admit(conn)
                        rows = await outbox.claim(
                            conn, owner=self.owner, lease_seconds=self.lease_seconds, limit=free
                        )
                        # with rows claimed, their attempts wake this loop again when they
                        # end; only an empty claim needs to know when the next row is due
                        next_due = None if rows else await outbox.next_due_in(conn)
                except StoreError as exc:
                    failures += 1
                    delay = min(self.poll_seconds * failures, 30.0)
                    log.warning("delivery_claim_failed", error=str(exc), retry_in=delay)
                    await self._sleep(delay)
                    continue
                failures = 0
                # the database's lease started after claimed_at: this deadline is within it
                deadline = claimed_at + self.lease_seconds
                for row in rows:
                    self._spawn(row, deadline)
                if len(rows) == free:
                    continue
                if next_due is not None:
                    timeout = min(self.poll_seconds, max(next_due, MIN_SLEEP))
            await self._sleep(timeout)

    async def _admit(self, conn: asyncpg.Connection) -> None:
        """Make due the waiting generate calls that the in-flight caps leave room for."""
        for kind, cap in self.caps.items():
            if cap or not self._uncapped_released:
                admitted = await admission.admit(conn, kind, cap)
                if admitted:
                    log.info("delivery_admitted", kind=kind.value, jobs=admitted, cap=cap)
        self._uncapped_released = True

    def job_ended(self, kind: Kind) -> None:
        """A job of `kind` reached a terminal status in this process: under an in-flight cap
        its slot is handed over now, not at the next poll."""
        if self.caps[kind]:
            self._wake.set()

    async def pause(self, kind: Kind, seconds: float) -> None:
        """No admission of `kind` for `seconds`, on every replica (a backend 429)."""
        try:
            async with self.database.connection() as conn:
                await admission.pause(conn, kind, seconds)
        except StoreError as exc:
            log.warning("delivery_pause_failed", kind=kind.value, error=str(exc))
            return
        metrics.BACKEND_PAUSES.labels(kind=kind.value).inc()
        log.info("delivery_paused", kind=kind.value, seconds=seconds)

    async def _sleep(self, seconds: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _spawn(self, row: outbox.Claimed, deadline: float) -> None:
        attempt = _Attempt(self, row, deadline)
        task = asyncio.create_task(attempt.run(), name=f"delivery-{row.id}")
        self._attempts[task] = attempt
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        attempt = self._attempts.pop(task, None)
        self._wake.set()  # a slot is free, and a retry may be due soon
        if not task.cancelled() and (exc := task.exception()) is not None and attempt:
            log.error(
                "delivery_attempt_crashed",
                job_id=attempt.row.job_id,
                outbox_id=attempt.row.id,
                error=repr(exc),
            )

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """The wait after failed attempt number `attempt` (1-based), jittered, never shorter
        than the backend's Retry-After."""
        base = self.schedule[attempt - 1] * self._random.uniform(1 - JITTER, 1 + JITTER)
        if retry_after is not None:
            base = max(base, min(retry_after, MAX_RETRY_AFTER))
        return base

    def inline_wait(self, calls: int, retry_after: float | None) -> float:
        base = INLINE_BACKOFF[min(calls, len(INLINE_BACKOFF)) - 1]
        return max(base * self._random.uniform(1, 1 + JITTER), retry_after or 0.0)


class _Attempt:
    """One claim of one row: the tries, then exactly one outcome written."""

    def __init__(self, dispatcher: Dispatcher, row: outbox.Claimed, deadline: float) -> None:
        self.d = dispatcher
        self.row = row
        self.deadline = deadline
        self.started = False
        self.calls = 0
        self._last: Transient | None = None
        self.log = log.bind(
            job_id=row.job_id, outbox_id=row.id, action=row.action, attempt=row.attempts
        )

    async def run(self) -> None:
        row = self.row
        if row.action == "generate" and row.job_status.terminal:
            await self._settle_unsent()
            return
        try:
            answer = await self._send()
        except Refused as exc:
            what = "job" if row.action == "generate" else "cancel"
            await self._fail(f"the generator backend refused the {what}: {exc.message}",
                             status=exc.status)
        except Unsendable as exc:
            what = "job" if row.action == "generate" else "cancel"
            await self._fail(f"the {what} could not be sent to the generator backend: "
                             f"{exc.message}", status=None)
        except Transient as exc:
            if row.attempts > len(self.d.schedule):
                await self._fail(
                    f"the generator backend was unreachable after {row.attempts} attempts; "
                    f"last error: {exc.message}",
                    status=exc.status,
                )
            else:
                await self._reschedule(exc)
        else:
            await self._delivered(answer)

    # -- sending -------------------------------------------------------------------------

    async def _send(self) -> Accepted:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Transient),
            stop=self._stop_inline,
            wait=self._inline_wait,
            sleep=self._sleep_inline,
            before_sleep=self._before_inline_retry,
            reraise=True,
        )
        return await retrying(self._call)

    async def _call(self) -> Accepted:
        self.started = True
        self.calls += 1
        row = self.row
        self.log.info("delivery_attempt", call=self.calls, job_status=row.job_status.value)
        if row.action == "generate":
            if row.payload is None:
                raise Unsendable("the outbox row has no request body")
            return await self.d.client.generate(
                row.kind, row.job_id, row.payload, time_limit=self.d.timeout
            )
        return await self.d.client.cancel(
            row.kind,
            row.job_id,
            row.backend_job_id or row.job_id,
            row.payload,
            time_limit=self.d.timeout,
        )

    def _inline_wait(self, state: RetryCallState) -> float:
        """Before another try: a short backoff, or the backend's Retry-After if longer."""
        self._last = _transient(state)
        return self.d.inline_wait(self.calls, self._last.retry_after)

    def _stop_inline(self, state: RetryCallState) -> bool:
        """After a transient failure (and its wait computed): is another try possible within
        this attempt?"""
        exc = _transient(state)
        if self.calls >= INLINE_TRIES or self.d.stopping.is_set():
            return True
        if exc.retry_after is not None and exc.retry_after > INLINE_MAX_WAIT:
            return True  # the schedule waits that long, not this claim
        if isinstance(exc, TimedOut):
            # a hanging backend is not tried again at once: the attempt ends at the timeout,
            # its slot goes to another row, and the schedule decides when to try again
            return True
        now = asyncio.get_running_loop().time()
        # the next try could outlive the lease: leave it to the next claim
        return now + state.upcoming_sleep + self.d.timeout + SETTLE_MARGIN > self.deadline

    async def _sleep_inline(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.d.stopping.wait(), seconds)
        except TimeoutError:
            return
        assert self._last is not None
        raise self._last  # shutting down: end the attempt here, as a retry

    async def _before_inline_retry(self, state: RetryCallState) -> None:
        assert self._last is not None
        metrics.DELIVERY_ATTEMPTS.labels(self.row.action, "retry").inc()
        self.log.info(
            "delivery_retry",
            call=self.calls,
            status=self._last.status,
            error=self._last.message,
            retry_in=round(state.upcoming_sleep, 3),
            within_attempt=True,
        )

    # -- outcomes ------------------------------------------------------------------------

    async def _delivered(self, answer: Accepted) -> None:
        row = self.row
        backend_id = answer.job_id if answer.job_id and answer.job_id != row.job_id else None
        done = await _settle(lambda: delivery.accepted(self.d.database, row, backend_id))
        if done is None:
            return
        metrics.DELIVERY_ATTEMPTS.labels(row.action, "delivered").inc()
        if not done.recorded:
            self.log.info("delivery_already_settled", status=answer.status)
            return
        if done.alias == "conflict":
            self.log.warning("delivery_alias_conflict", backend_job_id=backend_id)
        for finished in done.finished:
            _count_terminal(finished)
        self.log.info(
            "delivery_delivered",
            status=answer.status,
            calls=self.calls,
            backend_job_id=backend_id,
            alias=done.alias,
        )

    async def _fail(self, error: str, *, status: int | None) -> None:
        row = self.row
        result = await _settle(
            lambda: delivery.failed(self.d.database, row, owner=self.d.owner, error=error)
        )
        if result is None:
            return
        held, finished = result
        metrics.DELIVERY_ATTEMPTS.labels(row.action, "failed").inc()
        if finished is not None:
            _count_terminal(finished)
        if held:
            self.log.warning("delivery_failed", status=status, calls=self.calls, error=error)
        else:
            self.log.warning("delivery_claim_lost", status=status, error=error)

    async def _reschedule(self, exc: Transient) -> None:
        row = self.row
        if exc.status == 429 and exc.retry_after and self.d.caps[row.kind]:
            # the backend's quota is shared by every job of the kind, not only this one
            await self.d.pause(row.kind, min(exc.retry_after, MAX_RETRY_AFTER))
        delay = self.d.retry_delay(row.attempts, exc.retry_after)
        held = await _settle(lambda: delivery.retried(
            self.d.database, row, owner=self.d.owner, delay_seconds=delay, error=exc.message))
        if held is None:
            return
        metrics.DELIVERY_ATTEMPTS.labels(row.action, "retry").inc()
        self.log.info(
            "delivery_retry",
            call=self.calls,
            status=exc.status,
            error=exc.message,
            retry_in=round(delay, 3),
            retry_after=exc.retry_after,
            within_attempt=False,
            claim_held=held,
        )

    async def _settle_unsent(self) -> None:
        """A generate row whose job ended before delivery: settled without a call."""
        row = self.row
        if await _settle(lambda: delivery.skipped(self.d.database, row, owner=self.d.owner)):
            self.log.info("delivery_skipped", job_status=row.job_status.value,
                          reason=delivery.unsent_reason(row))


def _transient(state: RetryCallState) -> Transient:
    assert state.outcome is not None
    exc = state.outcome.exception()
    assert isinstance(exc, Transient)  # the only exception retried
    return exc


async def _settle(work: Callable[[], Awaitable[_T]]) -> _T | None:
    """Write an outcome, riding out a short database outage; None when it could not be
    written (the lease then expires and the row is sent again, under the same key)."""
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StoreUnavailable),
            stop=stop_after_attempt(4),
            wait=wait_exponential(multiplier=0.25, max=2.0),
            reraise=True,
        ):
            with attempt:
                return await work()
    except StoreError as exc:
        log.error("delivery_settle_failed", error=str(exc))
    return None


def _count_terminal(finished: delivery.Finished) -> None:
    """Metrics of a job that reached a terminal status here."""
    job, status = finished.job, finished.status
    if finished.notified and status is not Status.CANCELLED:
        metrics.NOTIFICATIONS_CREATED.labels(f"{job.kind.label}_{status.value}").inc()
    elapsed = (dt.datetime.now(dt.UTC) - job.created_at).total_seconds()
    metrics.JOB_DURATION.labels(job.kind.value, status.value).observe(max(elapsed, 0.0))
