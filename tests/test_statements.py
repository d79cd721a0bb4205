"""The composed statements: rendered whole in sql/statements, and composed safely."""

from __future__ import annotations

import pytest

from gateway.store.statements import Statement, composed, statements_dir


def test_every_composed_statement_is_committed_as_rendered() -> None:
    statements = composed()
    assert {"APPLY", "APPLY_FINISHED", "INGEST", "INGEST_FINISHED",
            "DELIVERED_AND_APPLY"} <= set(statements)
    for name, (module, statement) in statements.items():
        path = statements_dir() / f"{name}.sql"
        assert path.is_file(), f"{path} is missing: run python -m gateway.store.statements"
        assert path.read_text() == statement.rendered(module), (
            f"{path} differs from {module}.{name}: run python -m gateway.store.statements")


def test_no_rendered_file_outlives_its_statement() -> None:
    files = {p.stem for p in statements_dir().glob("*.sql")}
    assert files == set(composed())


def test_named_parameters_are_numbered_in_the_declared_order() -> None:
    s = Statement.compose("T", "t", "SELECT $b, $a, $b", ("a", "b"))
    assert s.sql == "SELECT $2, $1, $2"
    assert s.args({"b": 2, "a": 1, "unused": 3}) == (1, 2)


def test_a_parameter_used_but_not_declared_is_refused() -> None:
    with pytest.raises(ValueError, match="declared"):
        Statement.compose("T", "t", "SELECT $a, $b", ("a",))


def test_a_parameter_declared_but_not_used_is_refused() -> None:
    with pytest.raises(ValueError, match="declared"):
        Statement.compose("T", "t", "SELECT $a", ("a", "b"))


def test_a_numbered_parameter_in_a_composed_statement_is_refused() -> None:
    with pytest.raises(ValueError, match="numbered"):
        Statement.compose("T", "t", "SELECT $a, $1", ("a",))


def test_a_missing_value_is_an_error_not_a_null() -> None:
    s = Statement.compose("T", "t", "SELECT $a", ("a",))
    with pytest.raises(KeyError):
        s.args({})
