"""Pre-built requests and the sender process that replays them (bench/sender.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT


def raw_request(method: str, path: str, port: int, headers: dict[str, str], body: bytes) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
            f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def write_requests(
    path: Path, requests: Sequence[bytes], after: Sequence[int] | None = None
) -> None:
    """Records `<length> <after>\\n<raw request>` in sending order; `after` is the index of a
    request that must be answered before this one is sent (-1: none)."""
    with path.open("wb") as f:
        for n, raw in enumerate(requests):
            f.write(b"%d %d\n" % (len(raw), after[n] if after is not None else -1))
            f.write(raw)


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    sent: int
    answered: int
    statuses: dict[str, int]
    outcomes: dict[str, int]
    resent: int
    reconnects: int
    failed: int
    dependency_waits: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    sender_cpu_seconds: float

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def error_count(self, ok_statuses: Sequence[int]) -> int:
        """Answers outside `ok_statuses`, requests never answered, connections lost."""
        bad = sum(n for s, n in self.statuses.items() if int(s) not in ok_statuses)
        return bad + self.failed + self.resent + (self.sent - self.answered)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["throughput"] = round(self.throughput, 1)
        data["seconds"] = round(self.seconds, 3)
        data["sender_cpu_seconds"] = round(self.sender_cpu_seconds, 2)
        return data


def replay(path: Path, port: int, *, connections: int, timeout: float = 900.0) -> Replay:
    """Send every request in `path` once over `connections` keep-alive connections."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.sender", str(path), str(port), str(connections)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sender failed:\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Replay(
        sent=data["sent"],
        answered=data["answered"],
        statuses=data["statuses"],
        outcomes=data["outcomes"],
        resent=data["resent"],
        reconnects=data["reconnects"],
        failed=data["failed"],
        dependency_waits=data["dependency_waits"],
        seconds=data["seconds"],
        p50_ms=data["p50_ms"],
        p90_ms=data["p90_ms"],
        p99_ms=data["p99_ms"],
        max_ms=data["max_ms"],
        sender_cpu_seconds=data["cpu_seconds"],
    )
