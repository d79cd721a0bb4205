"""Statements composed from shared parts, with named parameters, rendered whole for readers.

A few hot statements share their parts (the job's UPDATE and event row, a terminal event's
files and notification): composing them keeps each part in one place. The parts name their
parameters (`$status`), never number them; `compose` numbers them in the order the statement
declares, so no reader has to count, and `args` binds values by name.

Each composed statement is rendered into `sql/statements/NAME.sql`, committed, so the SQL
that runs can be read whole; a test fails when a file and its statement differ, and
`python -m gateway.store.statements` writes them again.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_NAMED = re.compile(r"\$([a-z_][a-z0-9_]*)")
_NUMBERED = re.compile(r"\$\d")

# The modules whose composed statements are rendered into sql/statements.
MODULES = ("gateway.store.jobs", "gateway.store.webhooks", "gateway.store.outbox")


@dataclasses.dataclass(frozen=True, slots=True)
class Statement:
    name: str
    summary: str
    params: tuple[str, ...]
    # the SQL as sent: `$1`, `$2`, ... in the order of `params`
    sql: str

    @classmethod
    def compose(cls, name: str, summary: str, text: str, params: tuple[str, ...]) -> Statement:
        """`text` with its named parameters numbered in the order of `params`, which must
        name each of them exactly once."""
        used = set(_NAMED.findall(text))
        if _NUMBERED.search(text):
            raise ValueError(f"{name}: numbered parameters in a composed statement")
        if len(set(params)) != len(params) or used != set(params):
            raise ValueError(
                f"{name}: declared {sorted(params)}, used {sorted(used)}"
            )
        number = {p: i for i, p in enumerate(params, start=1)}
        return cls(name, summary, params, _NAMED.sub(lambda m: f"${number[m[1]]}", text))

    def args(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The parameters in order, from `values` by name (it may hold more)."""
        return tuple(values[p] for p in self.params)

    def rendered(self, module: str) -> str:
        """The text of sql/statements/NAME.sql."""
        lines = [
            f"-- name: {self.name}",
            *(f"-- {line}" for line in self.summary.splitlines()),
            f"-- Composed in {module}; rendered by `python -m gateway.store.statements`.",
            *(f"-- ${i}: {p}" for i, p in enumerate(self.params, start=1)),
            self.sql.strip(),
        ]
        return "\n".join(lines) + "\n"


def composed() -> dict[str, tuple[str, Statement]]:
    """Every composed statement by name, with the module that composes it."""
    found: dict[str, tuple[str, Statement]] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, Statement):
                found[value.name] = (module_name, value)
    return dict(sorted(found.items()))


def statements_dir() -> Path:
    from gateway.store.migrations import sql_dir

    return sql_dir() / "statements"


def write(directory: Path | None = None) -> list[Path]:
    """Render every composed statement into its file; remove files of statements gone."""
    target = directory or statements_dir()
    target.mkdir(parents=True, exist_ok=True)
    statements = composed()
    written = []
    for name, (module, statement) in statements.items():
        path = target / f"{name}.sql"
        path.write_text(statement.rendered(module))
        written.append(path)
    for stale in target.glob("*.sql"):
        if stale.stem not in statements:
            stale.unlink()
    return written


def main() -> None:
    for path in write():
        sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    # run as a script this module is __main__: the statements are the imported module's
    importlib.import_module("gateway.store.statements").main()
