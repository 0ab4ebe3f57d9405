"""Markdown table cells and tables of the report."""
from __future__ import annotations

import math


def fmt(x: float | None, digits: int = 3) -> str:
    """A table cell: 'diverged' for +inf (a diverged run's loss), '—' for a missing or undefined number."""
    return "diverged" if x == math.inf else "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
