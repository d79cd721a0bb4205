"""pgbench as the limit: the gateway's own SQL constants, with pgbench variables for $1..$n.

`bind` takes a statement exactly as the gateway runs it (imported from `gateway.store`) and
puts a pgbench variable (`:name`) or a SQL literal in place of each positional parameter.
With `-M prepared`, pgbench sends the variables as bind parameters of a prepared statement,
as asyncpg does, so the database does the same work as for the gateway, minus the gateway.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bench.common import ensure_tool, percentile

_PLACEHOLDER = re.compile(r"\$(\d+)\b")


def bind(sql: str, params: Mapping[int, str]) -> str:
    """`sql` with every `$n` replaced by `params[n]`; each parameter must be given, and used."""
    used: set[int] = set()

    def substitute(match: re.Match[str]) -> str:
        number = int(match[1])
        if number not in params:
            raise KeyError(f"no value for ${number} in {sql[:60]!r}...")
        used.add(number)
        return params[number]

    bound = _PLACEHOLDER.sub(substitute, sql)
    unused = set(params) - used
    if unused:
        raise KeyError(f"parameters {sorted(unused)} are not in {sql[:60]!r}...")
    # pgbench ends a multi-line SQL command at its semicolon
    return "\n".join(line for line in bound.strip().splitlines() if line.strip()) + ";"


@dataclasses.dataclass(frozen=True, slots=True)
class PgbenchResult:
    transactions: int
    failed: int
    tps: float
    p50_ms: float
    p99_ms: float
    seconds: float
    output: str
    latencies_us: tuple[float, ...] = ()
    # the throughput of each run, when several are combined
    runs_tps: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "runs_tps": [round(t, 1) for t in self.runs_tps] or [round(self.tps, 1)],
            "transactions": self.transactions,
            "failed": self.failed,
            "tps": round(self.tps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "seconds": round(self.seconds, 2),
        }


def run(
    dsn: str,
    script: str,
    *,
    clients: int,
    transactions_per_client: int,
    variables: Mapping[str, str | int],
    threads: int = 2,
    keep_script: Path | None = None,
) -> PgbenchResult:
    """Run `script` with `clients` connections, `transactions_per_client` each, prepared mode."""
    pgbench = ensure_tool("pgbench")
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        script_path = Path(tmp) / "script.sql"
        script_path.write_text(script)
        if keep_script is not None:
            keep_script.write_text(script)
        argv = [pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads),
                "-t", str(transactions_per_client), "-l", "--log-prefix", f"{tmp}/log",
                "-f", str(script_path)]
        for name, value in variables.items():
            argv += ["-D", f"{name}={value}"]
        argv.append(dsn)
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        output = done.stdout + done.stderr
        if done.returncode not in (0, 2):  # 2: some transactions failed, counted below
            raise RuntimeError(f"pgbench failed ({done.returncode}):\n{output[-3000:]}")
        latencies, first, last = _read_logs(Path(tmp).glob("log*"))
    processed = _number(output, r"number of transactions actually processed: (\d+)")
    failed = _number(output, r"number of failed transactions: (\d+)", default=0)
    tps_match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", output)
    if tps_match is None:
        raise RuntimeError(f"pgbench printed no tps:\n{output[-3000:]}")
    return PgbenchResult(
        transactions=processed,
        failed=failed,
        tps=float(tps_match[1]),
        p50_ms=percentile(latencies, 50) / 1000,
        p99_ms=percentile(latencies, 99) / 1000,
        seconds=last - first,
        output=output,
        latencies_us=tuple(latencies),
    )


def combine(runs: Sequence[PgbenchResult]) -> PgbenchResult:
    """Runs before and after the gateway's, as one limit: the mean throughput, the latency
    percentiles of all their transactions together (the machine's load drifts meanwhile)."""
    latencies = [v for run in runs for v in run.latencies_us]
    return PgbenchResult(
        transactions=sum(r.transactions for r in runs),
        failed=sum(r.failed for r in runs),
        tps=sum(r.tps for r in runs) / len(runs),
        p50_ms=percentile(latencies, 50) / 1000,
        p99_ms=percentile(latencies, 99) / 1000,
        seconds=sum(r.seconds for r in runs),
        output="\n".join(r.output for r in runs),
        latencies_us=tuple(latencies),
        runs_tps=tuple(r.tps for r in runs),
    )


def _number(text: str, pattern: str, default: int | None = None) -> int:
    match = re.search(pattern, text)
    if match is None:
        if default is None:
            raise RuntimeError(f"pgbench output lacks {pattern!r}:\n{text[-3000:]}")
        return default
    return int(match[1])


def _read_logs(paths: Iterable[Path]) -> tuple[list[float], float, float]:
    """Per-transaction latencies (µs) and the first and last end times (s) of pgbench's logs."""
    latencies: list[float] = []
    first, last = float("inf"), 0.0
    for path in paths:
        for line in Path(path).read_text().splitlines():
            fields = line.split()
            # client_id transaction_no time script_no time_epoch time_us
            latency = float(fields[2])
            end = int(fields[4]) + int(fields[5]) / 1e6
            latencies.append(latency)
            first = min(first, end - latency / 1e6)
            last = max(last, end)
    return latencies, first, last
