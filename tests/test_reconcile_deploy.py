"""deploy/: the Kubernetes CronJob and the systemd timer run a valid pass every 5 minutes."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconcile.cli import _parser
from tests.deployment import DEPLOY, KUBERNETES, SCRIPTS


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def cronjob() -> Any:
    return yaml.safe_load((KUBERNETES / "base" / "reconcile-cronjob.yaml").read_text())


def test_the_cronjob_runs_one_pass_every_5_minutes_never_overlapping() -> None:
    job = cronjob()
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "CronJob")
    spec = job["spec"]
    assert spec["schedule"] == "*/5 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    command = container["command"]
    assert command[0] in SCRIPTS
    args = _parser().parse_args(command[1:])
    assert args.command == "run"
    assert not args.dry_run
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "DATABASE_URL"


def test_the_systemd_timer_starts_the_oneshot_service_every_5_minutes() -> None:
    timer = unit("sorami-reconcile.timer")
    service = unit("sorami-reconcile.service")
    assert timer["Timer"]["OnCalendar"] == "*:0/5"
    assert timer["Timer"]["Unit"] == "sorami-reconcile.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert service["Service"]["Type"] == "oneshot"
    executable, *argv = service["Service"]["ExecStart"].split()
    assert Path(executable).name in SCRIPTS
    assert _parser().parse_args(argv).command == "run"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    for name in ("sorami-reconcile.service", "sorami-reconcile.timer"):
        text = (DEPLOY / "systemd" / name).read_text()
        # the installed script's path on this machine instead of /opt/sorami
        script = Path(sys.executable).parent / "sorami-reconcile"
        (tmp_path / name).write_text(text.replace("/opt/sorami/bin/sorami-reconcile",
                                                  str(script)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "sorami-reconcile.timer"),
         str(tmp_path / "sorami-reconcile.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
