"""The benchmarks' pgbench scripts: built from the gateway's statements, every parameter bound,
every variable defined, and what they run does what the gateway does; and the CPU budget
their notes give."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import pytest

from bench import create, ingest
from bench.common import cpu_budget
from gateway.store import Database
from gateway.store import jobs as store_jobs
from tests.factories import insert_job

_VARIABLE = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_SET = re.compile(r"^\\set ([a-z_][a-z0-9_]*) ", re.MULTILINE)
_BUILTIN = {"client_id"}


def _undefined(script: str, variables: Mapping[str, object]) -> set[str]:
    # pgbench variables outside SQL casts (`::text` is not a variable)
    used = set(_VARIABLE.findall(script))
    return used - set(variables) - set(_SET.findall(script)) - _BUILTIN


@pytest.mark.parametrize(
    ("script", "variables"),
    [
        (ingest.pgbench_script, lambda: ingest.pgbench_variables(1, 2)),
        (lambda: ingest.pgbench_script(notify=False), lambda: ingest.pgbench_variables(1, 2)),
        (lambda: create.pgbench_script("off", 100), lambda: create.pgbench_variables(1)),
        (lambda: create.pgbench_script("on", 100), lambda: create.pgbench_variables(1)),
    ],
    ids=["ingest", "ingest without notify", "create", "create with limits"],
)
def test_every_placeholder_is_bound_and_every_variable_defined(
    script: Callable[[], str], variables: Callable[[], Mapping[str, object]]
) -> None:
    text = script()
    assert not re.search(r"\$\d", text), "a $n placeholder left unbound"
    assert _undefined(text, variables()) == set()


def test_the_script_without_notify_differs_only_by_its_notify() -> None:
    with_notify, without = ingest.pgbench_script(), ingest.pgbench_script(notify=False)
    assert with_notify.count("pg_notify(") == 2  # progress and completion
    assert "pg_notify" not in without
    assert with_notify.replace(store_jobs.NOTIFY_CALL, "NULL::void") == without


async def test_the_ingest_statements_as_bound_apply_a_progress_then_a_completion(
    db: Database,
) -> None:
    """The values pgbench binds, sent by the gateway's own driver: the job moves as the
    gateway's would, and a repeat of the completion changes nothing."""
    job_id = await insert_job(db, job_id="1000000000000000042")
    results = []
    for payload, key in ((ingest.progress_payload(42), "k1"), (ingest.completed_payload(42), "k2"),
                         (ingest.completed_payload(42), "k2")):
        statement, args = ingest.gateway_arguments(payload)
        bound = tuple(key if a == "id:bench" else a for a in args)
        row = await db.fetchrow(statement, *bound)
        assert row is not None
        results.append((row["seen"], row["claimed"], row["applies"]))
    assert results == [(False, True, True), (False, True, True), (True, False, False)]
    job = await db.fetchrow("SELECT status, progress, seq FROM jobs WHERE id = $1", job_id)
    assert (job["status"], job["progress"], job["seq"]) == ("COMPLETED", 100, 3)
    assert await db.fetchval("SELECT count(*) FROM job_files WHERE job_id = $1", job_id) == 2
    assert await db.fetchval("SELECT metadata->>'job_id' FROM notifications") == job_id


def test_the_cpu_budget_is_the_cores_the_target_rate_keeps_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # 10,000 webhooks: 0.40 + 0.20 ms each; 1.5 x 2,000/s = 3,000/s of 0.6 ms = 1.8 cores
    text = cpu_budget({"server": 4.0, "PostgreSQL": 2.0}, 10_000, 2_000.0, 1.5, "webhook")
    assert text == ("CPU a webhook: server 0.40 ms, PostgreSQL 0.20 ms, 0.60 ms in all; "
                    "1.5 x the limit (3,000/s) would keep 1.8 cores busy, of 2")
