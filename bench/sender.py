"""A lean HTTP/1.1 load sender: pre-built requests, each sent once, over keep-alive connections.

Run as its own process (`python -m bench.sender FILE PORT CONNECTIONS`) so that its CPU time
is measured apart from the server's. The connections take requests from one shared list in
order; a request is written only when its connection's previous answer is in (no
pipelining). A request may name an earlier one that must be answered before it is sent (a
job's completion after its progress), as a backend sends a job's webhooks one after another.
A connection that closes with a request in flight is reopened and the request sent again (a
sender's retry; the receiver's dedupe makes that safe) and counted, never lost silently.
Prints one JSON line: counts by status and outcome, latency percentiles, wall and CPU time.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

_OUTCOME = re.compile(rb'"outcome":\s*"([a-z]+)"')


def read_requests(path: Path) -> tuple[list[bytes], list[int]]:
    """Records `<length> <after>\\n<raw request>` (bench.load.write_requests): the requests and,
    for each, the index of the one that must be answered first (-1: none)."""
    data = path.read_bytes()
    out: list[bytes] = []
    after: list[int] = []
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        length, before = (int(v) for v in data[pos:nl].split())
        out.append(data[nl + 1:nl + 1 + length])
        after.append(before)
        pos = nl + 1 + length
    return out, after


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("closed with a request in flight"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._try_complete()

    def _try_complete(self) -> None:
        if self.waiter is None or self.waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buffer[end + 4:total])
        del self.buffer[:total]
        self.waiter.set_result((status, body))

    def send(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter


async def run(
    requests: list[bytes], after: list[int], port: int, connections: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    answered: set[int] = set()
    awaited: dict[int, asyncio.Event] = {}
    waits = 0
    latencies: list[int] = []
    statuses: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    counters = {"resent": 0, "reconnects": 0, "failed": 0}
    position = 0
    first_sent = 0.0
    last_answer = 0.0

    async def open_connection() -> _Connection:
        _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
        return protocol

    async def worker() -> None:
        nonlocal position, first_sent, last_answer, waits
        conn = await open_connection()
        while position < len(requests):
            index = position
            raw = requests[index]
            position += 1
            before = after[index]
            if before >= 0 and before not in answered:
                waits += 1
                await awaited.setdefault(before, asyncio.Event()).wait()
            for _attempt in range(5):
                if conn.closed:
                    counters["reconnects"] += 1
                    conn = await open_connection()
                started = time.perf_counter_ns()
                if not first_sent:
                    first_sent = time.monotonic()
                try:
                    status, body = await conn.send(raw)
                except ConnectionError:
                    counters["resent"] += 1
                    continue
                latencies.append(time.perf_counter_ns() - started)
                last_answer = time.monotonic()
                answered.add(index)
                if index in awaited:
                    awaited[index].set()
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                match = _OUTCOME.search(body)
                key = match[1].decode() if match and 200 <= status < 300 else f"status_{status}"
                outcomes[key] = outcomes.get(key, 0) + 1
                break
            else:
                counters["failed"] += 1
                answered.add(index)  # given up: nothing waits on it forever
                if index in awaited:
                    awaited[index].set()
        if conn.transport is not None:
            conn.transport.close()

    before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker() for _ in range(connections)))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] / 1e6

    return {
        "sent": len(requests),
        "answered": len(latencies),
        "statuses": statuses,
        "outcomes": outcomes,
        **counters,
        "dependency_waits": waits,
        "first_sent": first_sent,
        "last_answer": last_answer,
        "seconds": last_answer - first_sent,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": latencies[-1] / 1e6 if latencies else float("nan"),
        # while sending only (reading the file and starting up are left out)
        "cpu_seconds": (usage.ru_utime + usage.ru_stime) - (before.ru_utime + before.ru_stime),
    }


def main() -> None:
    path, port, connections = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    requests, after = read_requests(path)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(requests, after, port, connections))
    else:
        result = uvloop.run(run(requests, after, port, connections))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
