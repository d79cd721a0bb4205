"""What every benchmark shares: the machine, databases, tools, server processes, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from gateway import embedded
from gateway.settings import webhook_key
from gateway.store.dsn import with_database
from gateway.store.migrations import migrate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# jobs of the benchmarks: ids that pgbench can compute as integers (see bench.pgbench)
JOB_ID_BASE = 1_000_000_000_000_000_000


def server_url() -> str:
    """The PostgreSQL server the benchmarks create their databases on."""
    return os.environ.get("BENCH_DATABASE_URL", DEFAULT_SERVER_URL)


@contextlib.asynccontextmanager
async def scratch_database(label: str, *, migrated: bool = True) -> AsyncIterator[str]:
    """A fresh database (migrated unless told not) for one benchmark, dropped afterwards
    whatever happens."""
    admin_url = server_url()
    name = f"bench_{label}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    try:
        if migrated:
            await migrate(url)
        yield url
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# --- the machine ------------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def wait_for_quiet(threshold: float, max_wait: float) -> tuple[float, float, float]:
    """Wait (up to `max_wait` s) for the 1-minute load average to fall under `threshold`."""
    deadline = time.monotonic() + max_wait
    load = loadavg()
    while load[0] >= threshold and time.monotonic() < deadline:
        print(f"  waiting for a quieter machine: load {load[0]:.2f} >= {threshold}", flush=True)
        time.sleep(10)
        load = loadavg()
    return load


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def machine_info() -> dict[str, Any]:
    try:
        conn = await asyncpg.connect(server_url(), timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise SystemExit(
            f"bench: no PostgreSQL answers at BENCH_DATABASE_URL ({server_url()}): {exc}.\n"
            "The benchmarks need a PostgreSQL server of their own that they reach over TCP "
            "(pgbench and the servers they start connect to it), not the embedded one; set "
            "BENCH_DATABASE_URL to a user allowed to create databases."
        ) from None
    try:
        pg_version = await conn.fetchval("SHOW server_version")
        pg_settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("max_connections", "shared_buffers", "synchronous_commit", "fsync")
        }
    finally:
        await conn.close()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_mib": _mem_total_mib(),
        "loadavg_before": loadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "postgresql_settings": pg_settings,
        "pgbench": _version(["pgbench", "--version"]),
    }


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


# --- tools from Debian ------------------------------------------------------------------------

_DEBIAN_PACKAGES = {"pgbench": "postgresql-client"}


def ensure_tool(name: str) -> str:
    """The path of `name`, installed from Debian's packages when missing and we are root."""
    found = shutil.which(name)
    if found:
        return found
    package = _DEBIAN_PACKAGES[name]
    if os.geteuid() != 0:
        raise SystemExit(
            f"bench: {name} is missing; install it with `apt-get install {package}` (as root)"
        )
    print(f"  installing {package} from Debian for {name}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"bench: {name} still missing after installing {package}")
    return found


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def new_webhook_secret() -> tuple[str, bytes]:
    """A `whsec_` secret and the HMAC key it stands for."""
    secret = embedded.new_webhook_secret()
    return secret, webhook_key(secret)


def gateway_env(database_url: str, port: int, **extra: str) -> dict[str, str]:
    drop = ("DATABASE_URL", "WEBHOOK_SECRETS", "AUTH_HS256_SECRET", "AUTH_JWKS_URL",
            "LEGACY_WEBHOOK_SECRET", "BACKEND_URL", "PORT", "HOST", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        DATABASE_URL=database_url,
        SORAMI_EMBEDDED="off",
        HOST="127.0.0.1",
        PORT=str(port),
        LOG_LEVEL="warning",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Server:
    """`python -m gateway serve ...` as an operator starts it (or another `module`, the bench's
    reference server); stderr kept in a file."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str], log_path: Path,
        module: str = "gateway",
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=dict(env),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.port = int(env["PORT"])

    async def wait_ready(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"gateway not ready: {self.log_path.read_text()[-2000:]}")

    def pids(self) -> list[int]:
        """The serving processes: the workers when there are some, else the process itself."""
        children = child_pids(self.popen.pid)
        # the spawn context also starts a resource tracker; workers run gateway code
        workers = [p for p in children if b"multiprocessing.spawn" in _cmdline(p)]
        return workers or [self.popen.pid]

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._log.close()
        return self.popen.returncode


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def child_pids(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command may hold spaces and parentheses: fields follow the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of a process so far; with `children`, that of its children it
    waited for too (where the CPU of exited PostgreSQL backends goes)."""
    user, system = cpu_split(pid, children=children)
    return user + system


def cpu_split(pid: int, *, children: bool = False) -> tuple[float, float]:
    """`cpu_seconds` as (user, system): system time is the kernel's work for the process
    (socket sends and receives, waking the process at the other end, epoll)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]), int(fields[12])
    if children:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user / ticks, system / ticks


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL process on the machine so far, exited backends
    included (the postmaster waits for them)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                total += cpu_seconds(int(entry.name), children=True)
        except (OSError, IndexError, ValueError):
            continue
    return total


@contextlib.contextmanager
def profiled(pids: Sequence[int], out_dir: Path, seconds: float, enabled: bool) -> Iterator[None]:
    """`py-spy record` on each pid for `seconds` while the body runs (when enabled)."""
    if not enabled:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
             "--format", "raw", "--output", str(out_dir / f"profile-{pid}.txt"), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    try:
        yield
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- statistics and output ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def span(values: Sequence[float], unit: str = "", digits: int = 2) -> str:
    """`low-high` of `values` (one value when they round alike), for the notes of a table."""
    low, high = min(values), max(values)
    if round(low, digits) == round(high, digits):
        return f"{low:,.{digits}f}{unit}"
    return f"{low:,.{digits}f}-{high:,.{digits}f}{unit}"


def cpu_budget(cpu_seconds: dict[str, float], items: int, limit_rate: float, target: float,
               unit: str) -> str:
    """What the target asks of this machine's CPU, at the CPU each process used per item in
    this run: the cores that `target` times the limit's rate would keep busy, beside the
    cores there are. More than there are: no design with these per-item costs meets it."""
    per_item = {name: seconds / items for name, seconds in cpu_seconds.items()}
    total = sum(per_item.values())
    rate = target * limit_rate
    parts = ", ".join(f"{name} {seconds * 1000:.2f} ms" for name, seconds in per_item.items())
    return (f"CPU a {unit}: {parts}, {total * 1000:.2f} ms in all; {target} x the limit "
            f"({rate:,.0f}/s) would keep {total * rate:.1f} cores busy, of {os.cpu_count()}")


def run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def result_dir(run: str) -> Path:
    path = RESULTS / _SAFE.sub("_", run)
    path.mkdir(parents=True, exist_ok=True)
    return path


def batch_sizes(port: int) -> dict[str, dict[str, float]]:
    """The group-commit stages' batches so far, from the server's /metrics: by stage, how
    many batches, their items, and the mean."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    seen: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "sorami_batch_size":
            continue
        for sample in family.samples:
            stage = seen.setdefault(sample.labels["stage"], {"batches": 0.0, "items": 0.0})
            if sample.name.endswith("_count"):
                stage["batches"] = sample.value
            elif sample.name.endswith("_sum"):
                stage["items"] = sample.value
    for stage in seen.values():
        stage["mean"] = round(stage["items"] / stage["batches"], 2) if stage["batches"] else 0.0
    return seen


def batches_text(batches: dict[str, float], noun: str) -> str:
    """A run's batches as printed: how many `noun` in how many transactions."""
    if not batches:
        return "no group commit"
    return (f"group commit: {batches['items']:,.0f} {noun} in {batches['batches']:,.0f} "
            f"transactions (mean {batches['mean']:.1f})")


def batching_env(batch_max: int | None) -> dict[str, str]:
    """The server's group-commit settings for a run (None: the gateway's defaults)."""
    if batch_max is None:
        return {}
    return {"WEBHOOK_BATCH_MAX": str(batch_max), "CREATE_BATCH_MAX": str(batch_max)}
