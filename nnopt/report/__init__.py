"""Reports rendered from a run's ``report.json`` document: HTML (:func:`render_html`) and Markdown.

:mod:`nnopt.report.document` reads the document (:func:`read_report`); :mod:`nnopt.report.tables` builds
the tables and notes that the HTML page (:mod:`nnopt.report.html`), its Markdown twin
(:mod:`nnopt.report.markdown`) and the plots (:mod:`nnopt.report.plots`) share. This module gathers
their public names.
"""

from __future__ import annotations

from typing import Any

from nnopt.report.document import (
    OBJECTIVE_PHRASES,
    OBJECTIVE_UNITS,
    Energy,
    LatencyPoint,
    ReportView,
    Row,
    number,
    read_report,
)
from nnopt.report.tables import (
    LABELS,
    SAME_SPEED,
    Table,
    energy_batch,
    energy_label,
    energy_table,
    format_value,
    in_points,
    latency_table,
    layer_energies,
    layers_table,
    recipe_text,
    smaller_not_faster,
    speed_notes,
    speed_ratios,
    split_text_columns,
    variant_table,
)

__all__ = [
    "LABELS", "OBJECTIVE_PHRASES", "OBJECTIVE_UNITS", "SAME_SPEED", "Energy", "LatencyPoint", "ReportView", "Row",
    "Table", "energy_batch", "energy_label", "energy_table", "format_value", "in_points", "latency_table",
    "layer_energies", "layers_table", "number", "read_report", "recipe_text", "render_html", "render_markdown",
    "smaller_not_faster", "speed_notes", "speed_ratios", "split_text_columns", "variant_table", "write_reports",
]


def __getattr__(name: str) -> Any:
    # The renderers import this module, so they are imported here only when asked for.
    if name in ("render_html", "write_reports"):
        from nnopt.report import html

        return getattr(html, name)
    if name == "render_markdown":
        from nnopt.report import markdown

        return markdown.render_markdown
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

