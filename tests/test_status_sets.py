"""Every set of job statuses the SQL uses comes from the state machine, never retyped."""

from __future__ import annotations

import ast
import pathlib
import re

import gateway
import reconcile
from gateway.jobs.state import ACTIVE, COMPLETABLE, TERMINAL, Status
from gateway.store import Database
from gateway.store.statuses import INDEX_STATUS_SETS, TERMINAL_LIST, UNCOMPLETABLE_LIST

# The one module that may spell the statuses out.
STATE_MODULE = pathlib.Path(gateway.__file__).parent / "jobs" / "state.py"
STATUS_WORD = "|".join(s.value for s in Status)
# a status as an SQL literal: 'COMPLETED'
SQL_LITERAL = re.compile(rf"'({STATUS_WORD})'")


def source_files() -> list[pathlib.Path]:
    roots = [pathlib.Path(gateway.__file__).parent, pathlib.Path(reconcile.__file__).parent]
    return sorted(p for root in roots for p in root.rglob("*.py") if p != STATE_MODULE)


def string_constants(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_no_sql_string_names_a_status_by_hand() -> None:
    found = [
        f"{path.name}:{line}: {match.group(0)}"
        for path in source_files()
        for line, text in string_constants(path)
        for match in SQL_LITERAL.finditer(text)
    ]
    assert len(source_files()) > 30
    assert found == []


def test_no_code_outside_the_state_machine_spells_a_status_out() -> None:
    words = {s.value for s in Status}
    found = [
        f"{path.name}:{line}: {text}"
        for path in source_files()
        for line, text in string_constants(path)
        if text in words
    ]
    assert found == []


def test_the_literal_finder_finds_a_status_in_sql() -> None:
    assert SQL_LITERAL.findall("WHERE status NOT IN ('COMPLETED', 'FAILED')") == [
        "COMPLETED", "FAILED"]
    assert SQL_LITERAL.findall("WHERE state = 'unresolved'") == []


def test_the_rendered_sets_are_the_state_machines() -> None:
    assert set(SQL_LITERAL.findall(TERMINAL_LIST)) == set(TERMINAL)
    assert set(SQL_LITERAL.findall(UNCOMPLETABLE_LIST)) == set(Status) - COMPLETABLE
    assert set(Status) - TERMINAL == ACTIVE
    assert ACTIVE | {Status.TIMED_OUT} == COMPLETABLE


async def test_each_partial_index_on_jobs_admits_exactly_the_derived_statuses(
    db: Database,
) -> None:
    rows = await db.fetch(
        "SELECT c.relname AS name, pg_get_expr(i.indpred, i.indrelid) AS predicate"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = 'jobs'::regclass AND i.indpred IS NOT NULL"
    )
    admitted: dict[str, frozenset[Status]] = {}
    for r in rows:
        if "status" not in r["predicate"]:
            continue
        # PostgreSQL prints `status NOT IN (...)` as `status <> ALL (ARRAY['A'::job_status, ...])`
        assert "<> ALL" in r["predicate"], r["predicate"]
        excluded = {Status(word) for word in SQL_LITERAL.findall(r["predicate"])}
        admitted[r["name"]] = frozenset(Status) - excluded
    assert admitted == INDEX_STATUS_SETS


async def test_the_status_type_lists_the_state_machines_statuses_in_order(db: Database) -> None:
    labels = await db.fetch(
        "SELECT enumlabel FROM pg_enum WHERE enumtypid = 'job_status'::regtype"
        " ORDER BY enumsortorder"
    )
    assert [r["enumlabel"] for r in labels] == [s.value for s in Status]
