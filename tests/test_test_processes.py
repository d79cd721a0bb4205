"""The suite stops what its tests start: a process left running fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LEAVES_ONE_BEHIND = """
    import os, subprocess, sys
    from pathlib import Path
    from tests import procs

    def test_starts_a_process_and_forgets_it() -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)"],
            env={**os.environ, procs.SESSION_MARK: procs.SESSION_ID},
            start_new_session=True,
        )
        Path(os.environ["PID_FILE"]).write_text(str(child.pid))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_a_process_that_outlives_the_tests_fails_the_run_and_is_killed(tmp_path: Path) -> None:
    test_file = tmp_path / "test_leaves_one_behind.py"
    test_file.write_text(textwrap.dedent(LEAVES_ONE_BEHIND))
    pid_file = tmp_path / "pid"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir", str(tmp_path),
         "-c", os.devnull, "-W", "ignore::ResourceWarning", str(test_file)],
        cwd=ROOT, env={**os.environ, "PID_FILE": str(pid_file)},
        capture_output=True, text=True, timeout=120,
    )
    assert "1 passed" in result.stdout, result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    pid = int(pid_file.read_text())
    assert f"left running by the tests (now killed): {pid}" in result.stdout
    assert not _alive(pid)
