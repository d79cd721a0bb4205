"""`sorami-gateway serve` as an operator runs it: settings, embedded default, workers, signals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import clean_env, free_port, serve_env, start, wait_ready


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PORT", "abc"), ("WEBHOOK_SECRETS", "nope"), ("WEBHOOK_TOLERANCE_SECONDS", "-1")],
)
def test_bad_setting_exits_2_with_one_line_naming_it(
    variable: str, value: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=clean_env(**{variable: value, "SORAMI_DATA_DIR": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"sorami-gateway: error: {variable}:")
    if variable == "WEBHOOK_SECRETS":
        assert value not in lines[0]  # a secret's value is never echoed


async def test_zero_configuration_is_ready_within_10s_and_reuses_its_data(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = clean_env(SORAMI_DATA_DIR=str(tmp_path / "data"), PORT=str(port))
    first = start(["serve"], env)
    try:
        took = await wait_ready(port, timeout=10)
    finally:
        code, err = first.stop()
    assert code == 0, err
    assert took < 10
    secrets_file = tmp_path / "data" / "secrets.env"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    assert "development secrets written to" in err
    assert "migration_applied" in err
    secrets_before = secrets_file.read_text()
    assert secrets_before.count("whsec_") == 1
    for secret_line in secrets_before.splitlines()[1:]:
        assert secret_line.split("=", 1)[1] not in err

    second = start(["serve"], env)
    try:
        await wait_ready(port, timeout=10)
    finally:
        code, err = second.stop()
    assert code == 0, err
    assert "migration_applied" not in err  # the same database, already migrated
    assert "development secrets written" not in err
    assert secrets_file.read_text() == secrets_before


async def test_workers_share_the_port_and_stop_on_sigterm(database_url: str) -> None:
    port = free_port()
    env = serve_env(database_url, PORT=str(port))
    proc = start(["serve", "--workers", "2"], env)
    try:
        await proc.wait_log('"event": "serving"', count=2)
        await wait_ready(port, timeout=10)
    finally:
        code, err = proc.stop()
    assert code == 0, err
    assert err.count('"event": "serving"') == 2
    assert err.count('"event": "stopped"') == 2


def test_external_database_without_secrets_refuses_to_serve(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=clean_env(DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "WEBHOOK_SECRETS" in result.stderr
