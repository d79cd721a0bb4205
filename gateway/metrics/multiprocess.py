"""prometheus-client's multiprocess mode for `serve --workers N`.

Each worker writes its counters and histograms to memory-mapped files in one directory and
the worker that answers a scrape sums them all. prometheus-client decides at import time,
from PROMETHEUS_MULTIPROC_DIR, whether a process writes such files, so the directory is
made and exported before the workers are spawned (they import everything afresh).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import multiprocess

ENV = "PROMETHEUS_MULTIPROC_DIR"


def directory() -> Path | None:
    """The directory this process shares its metrics through, or None when it is alone."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


@contextlib.contextmanager
def shared_directory() -> Iterator[Path]:
    """A fresh, empty directory for the workers' metric files, exported while it lives.

    Files of an earlier run would add old counts to the sums, so each run gets its own
    directory (under TMPDIR) and removes it at exit. An inherited PROMETHEUS_MULTIPROC_DIR
    is used as the parent directory, e.g. a tmpfs.
    """
    inherited = os.environ.get(ENV)
    if inherited:
        Path(inherited).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="sorami-metrics-", dir=inherited or None))
    os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        if inherited:
            os.environ[ENV] = inherited
            # this process imported prometheus-client in multiprocess mode there
            for own in Path(inherited).glob(f"*_{os.getpid()}.db"):
                own.unlink(missing_ok=True)
        else:
            os.environ.pop(ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int, path: Path) -> None:
    """Drop a dead worker's live gauges (in-flight requests); its counters keep counting."""
    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
