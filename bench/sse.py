"""Live events: many subscribers on one server process, jobs changing once a second.

`serve` (one process) holds the streams; this process is the client (one lean raw-socket
connection per subscriber). A separate process commits the changes through
`gateway.store.jobs.apply`, each job once a second, the jobs spread evenly over the second,
and writes the time just before the change into the event's message; latency is the time
from there to the event's arrival at a subscriber. The floor measured in the same run: a
bare LISTEN connection in this process, timing the NOTIFY that the same commit sends.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import msgspec

from bench.common import (
    Server,
    cpu_seconds,
    free_port,
    gateway_env,
    new_webhook_secret,
    percentile,
    profiled,
    rss_kib,
    scratch_database,
    wait_for_quiet,
)
from bench.report import Figure
from gateway.jobs.records import JobUpdate
from gateway.jobs.state import Event, Status
from gateway.store import jobs as store_jobs
from gateway.store.database import connect

INSERT_JOBS = """
INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, status, progress, message)
SELECT id, 'image', 'sse_user_' || n, 'a lighthouse at dusk', 'a lighthouse at dusk',
       'GENERATING', 0, 'Generating images'
FROM unnest($1::text[]) WITH ORDINALITY AS t(id, n)
"""


class _Event(msgspec.Struct):
    seq: int
    message: str | None


_decode_event = msgspec.json.Decoder(_Event).decode


class _Subscriber(asyncio.Protocol):
    """One SSE stream over raw HTTP/1.1 (chunked): records (seq, receive time, sent time)."""

    def __init__(self, request: bytes, ready: asyncio.Event) -> None:
        self.request = request
        self.ready = ready
        self.raw = bytearray()
        self.text = bytearray()
        self.headers_done = False
        self.status = 0
        self.events: list[tuple[int, float, float | None]] = []
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.ready.set()

    def data_received(self, data: bytes) -> None:
        received = time.time()
        self.raw += data
        if not self.headers_done:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.raw[9:12])
            del self.raw[:end + 4]
            self.headers_done = True
        # chunked transfer encoding: <hex size>\r\n<data>\r\n
        while True:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                break
            size = int(self.raw[:line_end].split(b";")[0], 16)
            if len(self.raw) < line_end + 2 + size + 2:
                break
            self.text += self.raw[line_end + 2:line_end + 2 + size]
            del self.raw[:line_end + 2 + size + 2]
        while (end := self.text.find(b"\n\n")) >= 0:
            block = bytes(self.text[:end])
            del self.text[:end + 2]
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    event = _decode_event(line[6:])
                    sent = _sent_time(event.message)
                    self.events.append((event.seq, received, sent))
                    self.ready.set()


def _sent_time(message: str | None) -> float | None:
    if message and message.startswith("t="):
        return float(message[2:])
    return None


def _updater(dsn: str, job_ids: list[str], seconds: int, start_at: float,
             results: multiprocessing.Queue[Any]) -> None:
    """The separate process committing the changes: each job once a second, spread evenly."""
    import uvloop

    async def main() -> list[tuple[str, int, float, float]]:
        conn = await connect(dsn)
        done: list[tuple[str, int, float, float]] = []
        step = 1.0 / len(job_ids)
        try:
            for second in range(seconds):
                for k, job_id in enumerate(job_ids):
                    due = start_at + second + k * step
                    delay = due - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    stamp = time.time()
                    async with conn.transaction():
                        job = await store_jobs.lock(conn, job_id)
                        assert job is not None
                        applied = await store_jobs.apply(conn, job, JobUpdate(
                            Event(Status.GENERATING, second + 1), source="webhook",
                            message=f"t={stamp:.6f}", from_webhook=True,
                        ))
                    done.append((job_id, applied.seq, stamp, time.time()))
        finally:
            await conn.close()
        return done

    results.put(uvloop.run(main()))


async def run(args: argparse.Namespace, out: Path) -> tuple[list[Figure], dict[str, Any]]:
    subscribers: int = args.subscribers
    job_count: int = args.sse_jobs
    seconds: int = args.sse_seconds
    secret, _ = new_webhook_secret()
    hs_secret = "bench-sse-" + "z" * 40
    job_ids = [str(uuid.uuid4()) for _ in range(job_count)]
    load = wait_for_quiet(args.quiet_load, args.quiet_wait)
    print(f"sse: load {load[0]:.2f}; {subscribers:,} subscribers on one process, "
          f"{job_count} jobs changing once a second for {seconds} s", flush=True)
    async with scratch_database("sse") as dsn:
        conn = await asyncpg.connect(dsn)
        await conn.execute(INSERT_JOBS, job_ids)
        port = free_port()
        env = gateway_env(dsn, port, WEBHOOK_SECRETS=secret, AUTH_HS256_SECRET=hs_secret)
        server = Server(["serve", "--no-migrate"], env, out / "sse-server.log")
        listener: asyncpg.Connection | None = None
        notified: dict[tuple[str, int], float] = {}
        streams: list[_Subscriber] = []
        try:
            await server.wait_ready()
            pid = server.pids()[0]
            await asyncio.sleep(1)
            rss_before = rss_kib(pid)

            def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
                job_id, _, seq = payload.rpartition(":")
                notified[(job_id, int(seq))] = time.time()

            listener = await asyncpg.connect(dsn)
            await listener.add_listener(store_jobs.NOTIFY_CHANNEL, on_notify)

            now = int(time.time())
            loop = asyncio.get_running_loop()
            gate = asyncio.Semaphore(100)

            async def subscribe(n: int) -> _Subscriber:
                k = n % job_count
                token = jwt.encode({"sub": f"sse_user_{k + 1}", "iat": now,
                                    "exp": now + 3600}, hs_secret, algorithm="HS256")
                request = (f"GET /api/jobs/{job_ids[k]}/events HTTP/1.1\r\n"
                           f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                           "Accept: text/event-stream\r\n\r\n").encode()
                ready = asyncio.Event()
                async with gate:
                    _, protocol = await loop.create_connection(
                        lambda: _Subscriber(request, ready), "127.0.0.1", port)
                    await asyncio.wait_for(ready.wait(), 30)
                return protocol

            connect_started = time.monotonic()
            cpu_start = cpu_seconds(pid)
            streams = list(await asyncio.gather(*(subscribe(n) for n in range(subscribers))))
            connect_seconds = time.monotonic() - connect_started
            await asyncio.sleep(1)
            rss_subscribed = rss_kib(pid)
            cpu_subscribed = cpu_seconds(pid)
            live = sum(1 for s in streams if s.status == 200 and s.events)
            print(f"sse: {live:,} streams live after {connect_seconds:.1f} s; server RSS "
                  f"{rss_before / 1024:.1f} -> {rss_subscribed / 1024:.1f} MiB", flush=True)

            ctx = multiprocessing.get_context("spawn")
            results: multiprocessing.Queue[Any] = ctx.Queue()
            start_at = time.time() + 2
            updater = ctx.Process(target=_updater,
                                  args=(dsn, job_ids, seconds, start_at, results))
            updater.start()
            with profiled([pid], out, min(args.profile_seconds, seconds), args.profile):
                changes: list[tuple[str, int, float, float]] = await loop.run_in_executor(
                    None, lambda: results.get(timeout=seconds + 120))
            updater.join()
            await asyncio.sleep(2)  # the last events in flight
            rss_after = rss_kib(pid)
            cpu_after = cpu_seconds(pid)
        finally:
            for s in streams:
                s.transport.close()
            if listener is not None:
                await listener.close()
            server.stop()
            await conn.close()

    # every change, at every subscriber of its job, exactly once and in order
    per_job_subscribers: dict[str, list[_Subscriber]] = {}
    for n, s in enumerate(streams):
        per_job_subscribers.setdefault(job_ids[n % job_count], []).append(s)
    latencies: list[float] = []
    missing = duplicates = 0
    expected_seqs = list(range(2, seconds + 2))
    for s in streams:
        seqs = [seq for seq, _, sent in s.events if sent is not None]
        missing += len(set(expected_seqs) - set(seqs))
        duplicates += len(seqs) - len(set(seqs))
        latencies += [(received - sent) * 1000 for _, received, sent in s.events
                      if sent is not None]
    floor = [(notified[(job, seq)] - stamp) * 1000 for job, seq, stamp, _ in changes
             if (job, seq) in notified]
    commit = [(committed - stamp) * 1000 for _, _, stamp, committed in changes]
    expected_events = subscribers * seconds
    per_subscriber_kib = (rss_subscribed - rss_before) / subscribers
    detail: dict[str, Any] = {
        "load_before": load,
        "subscribers": subscribers,
        "jobs": job_count,
        "seconds": seconds,
        "streams_live": live,
        "connect_seconds": round(connect_seconds, 2),
        "changes_committed": len(changes),
        "events_expected": expected_events,
        "events_received": len(latencies),
        "events_missing": missing,
        "events_repeated": duplicates,
        "latency_ms": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                       "p99": percentile(latencies, 99), "max": max(latencies, default=0.0)},
        "listen_floor_ms": {"p50": percentile(floor, 50), "p99": percentile(floor, 99),
                            "received": len(floor)},
        "commit_ms": {"p50": percentile(commit, 50), "p99": percentile(commit, 99)},
        "server_rss_kib": {"before": rss_before, "subscribed": rss_subscribed,
                           "after": rss_after},
        "rss_per_subscriber_kib": round(per_subscriber_kib, 1),
        "server_cpu_seconds": {"subscribing": round(cpu_subscribed - cpu_start, 2),
                               "streaming": round(cpu_after - cpu_subscribed, 2)},
    }
    p99, floor_p99 = detail["latency_ms"]["p99"], detail["listen_floor_ms"]["p99"]
    print(f"sse: {len(latencies):,}/{expected_events:,} events, p50 "
          f"{detail['latency_ms']['p50']:.1f} ms p99 {p99:.1f} ms (LISTEN floor p99 "
          f"{floor_p99:.1f} ms); {per_subscriber_kib:.1f} KiB per subscriber", flush=True)
    complete = missing == 0 and duplicates == 0 and live == subscribers
    figures = [
        Figure("sse", f"p99 delivery, {subscribers:,} subscribers", p99, "ms", floor_p99,
               p99 / floor_p99 if floor_p99 else None, "<= 100 ms", p99 <= 100,
               note="limit: a bare LISTEN connection hearing the same commits"),
        Figure("sse", "p50 delivery", detail["latency_ms"]["p50"], "ms",
               detail["listen_floor_ms"]["p50"]),
        Figure("sse", "memory per subscriber", round(per_subscriber_kib, 1), "KiB",
               note=f"server RSS {rss_before / 1024:.1f} MiB before, "
                    f"{rss_subscribed / 1024:.1f} MiB with {subscribers:,} streams"),
        Figure("sse", "events delivered", f"{len(latencies):,}/{expected_events:,}",
               target="all, in order", met=complete),
    ]
    return figures, detail
