"""No Docker engine runs here: check the Dockerfile against the project instead."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [
        line.split(None, 1)[1]
        for line in joined.splitlines()
        if line.split(None, 1)[:1] == [name]
    ]


def test_every_copied_file_exists() -> None:
    for args in instructions("COPY"):
        if args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source


def test_cmd_runs_the_console_script_serve_on_all_interfaces() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (cmd,) = instructions("CMD")
    argv = json.loads(cmd)
    assert argv[0] in scripts
    assert argv[1:] == ["serve", "--host", "0.0.0.0"]


def test_multi_stage_slim_non_root_with_a_healthcheck_on_healthz() -> None:
    froms = instructions("FROM")
    assert len(froms) >= 2
    assert all("slim" in f for f in froms)
    assert instructions("USER")
    assert instructions("USER")[-1] != "root"
    (health,) = instructions("HEALTHCHECK")
    assert "/healthz" in health
    assert "SORAMI_EMBEDDED=off" in DOCKERFILE  # DATABASE_URL is required in the container
    assert "[embedded]" not in DOCKERFILE
    assert "[test]" not in DOCKERFILE


def test_container_setting_makes_database_url_required(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.procs import clean_env

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=clean_env(SORAMI_EMBEDDED="off", SORAMI_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("sorami-gateway: error: DATABASE_URL:")
