"""Figures, the table they are printed in, and the JSON they are written to."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure, beside the limit measured in the same run and the target."""

    bench: str
    name: str
    value: float | int | str
    unit: str = ""
    limit: float | int | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in dataclasses.asdict(self).items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fmt(value: float | int | str | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 100):
        text = f"{int(value):,}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table (readable in a terminal, pasteable in the README)."""
    header = ["benchmark", "figure", "gateway", "limit (same run)", "ratio", "target", "met"]
    rows = [header]
    for f in figures:
        rows.append([
            f.bench,
            f.name,
            fmt(f.value, f.unit),
            fmt(f.limit, f.unit) if f.limit is not None else "-",
            f"{f.ratio:.2f}" if f.ratio is not None and math.isfinite(f.ratio) else "-",
            f.target or "-",
            {True: "yes", False: "NO", None: "-"}[f.met],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sanitize(value: Any) -> Any:
    """JSON has no NaN: figures that could not be measured become null."""
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return _clean(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(sanitize(data), indent=2, default=str, allow_nan=False) + "\n")
