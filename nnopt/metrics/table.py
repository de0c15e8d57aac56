"""Render result dataclasses as text tables (rich), for terminals and for ``str()``."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def render_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
    caption: str | None = None,
) -> str:
    """A plain-text table; numbers right-aligned. Used by ``__str__`` of result objects."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for i, name in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], (int, float)) or r[i] in ("-", None) for r in rows)
        table.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(format_cell(v) for v in row))
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue().rstrip("\n")


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
