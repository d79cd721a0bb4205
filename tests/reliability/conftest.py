"""The reliability suite: real server processes and a real PostgreSQL under load, crashes,
faults and hostile input. Every test here carries the `reliability` marker and reports its
figures, printed together at the end of the run (`pytest -m reliability` runs only these;
`-m "not reliability"` skips them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).parent
_REPORTED: list[tuple[str, dict[str, Any]]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


class Figures:
    """What one scenario measured, in the order it measured it."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """Figures of this scenario; reported whether it passed or not."""
    found = Figures()
    yield found
    if found.values:
        _REPORTED.append((request.node.nodeid, found.values))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORTED:
        return
    terminalreporter.section("reliability figures")
    for nodeid, values in _REPORTED:
        terminalreporter.write_line(nodeid.split("::", 1)[-1])
        for name, value in values.items():
            terminalreporter.write_line(f"    {name}: {_format(value)}")
