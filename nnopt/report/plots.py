"""Figures of a report as inline SVG text, drawn with matplotlib (imported only when a figure is drawn).

Each function returns one ``<svg>`` element ready to paste into an HTML page: no XML prolog, no
namespace URLs, no metadata, ids prefixed so that several figures can share a page, text kept as
text (searchable, escaped by matplotlib). Every model keeps one colour and marker in all figures.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from nnopt.report.document import OBJECTIVE_UNITS, ReportView, Row, number
from nnopt.report.tables import energy_batch, in_points

# Colour-blind-safe categorical colours (matplotlib's tab10 without its grey, which marks the baseline).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "v", "P", "X", "<", ">", "p", "h")
BASELINE_STYLE = ("#555555", "D")
COMPUTE_COLOUR, MEMORY_COLOUR = "#3b75af", "#ef8a3c"
SPARSITY_COLOUR, STRUCTURED_COLOUR = "#3b75af", "#2ca02c"
BUDGET_COLOUR = "#c0392b"
WIDTH_IN = 8.0

_RC: dict[Any, Any] = {  # Any keys: matplotlib >= 3.10 types them as one Literal of rc names
    "svg.fonttype": "none",  # text stays text: small, searchable, selectable
    "svg.hashsalt": "nnopt",  # the same report gives the same file
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#888888",
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
}


def variant_styles(view: ReportView) -> dict[str, tuple[str, str]]:
    """Colour and marker of each model, in report order; the baseline is grey."""
    styles: dict[str, tuple[str, str]] = {}
    others = 0
    for row in view.rows + view.front:
        if row.name in styles:
            continue
        if row.is_baseline:
            styles[row.name] = BASELINE_STYLE
        else:
            styles[row.name] = (PALETTE[others % len(PALETTE)], MARKERS[others // len(PALETTE) % len(MARKERS)])
            others += 1
    return styles


def tradeoff_svg(view: ReportView, x: str, fig_id: str) -> str:
    """Accuracy (or cosine) against ``x`` ("bytes", "latency", "energy" or "objective") per model.

    With a front: the plans joined by the front line, the chosen one ringed, the budget drawn.
    """
    styles = variant_styles(view)
    rows = view.front if view.front else view.rows
    if view.front and view.baseline is not None:
        rows = (view.baseline, *rows)
    candidates = [(r, _x_value(r, x), r.accuracy) for r in rows]
    points = [(r, px, py) for r, px, py in candidates if px is not None and py is not None and px > 0]
    scale = 100.0 if view.metric == "accuracy" else 1.0
    with _figure(WIDTH_IN, 4.2) as fig:
        ax = fig.add_subplot()
        if view.front:
            line = sorted((px, py * scale) for r, px, py in points if not r.is_baseline)
            ax.plot([p[0] for p in line], [p[1] for p in line], color="#9a9a9a", lw=1.2, zorder=1,
                    label="Pareto front")
        for row, px, py in points:
            colour, marker = styles[row.name]
            tag = " (baseline)" if row.is_baseline and row.name != "baseline" else ""
            ax.scatter([px], [py * scale], s=70, color=colour, marker=marker, edgecolor="white", linewidth=0.8,
                       alpha=0.9, zorder=3, label=_text(row.name + tag))
            if row.chosen:
                ax.scatter([px], [py * scale], s=320, facecolor="none", edgecolor="#111111", linewidth=1.8,
                           zorder=4, label="chosen plan")
                ax.annotate("chosen", (px, py * scale), xytext=(10, 10), textcoords="offset points",
                            fontweight="bold", fontsize=9, color="#111111")
        if view.budget is not None:
            drop = f" (baseline − {in_points(view.max_drop)})" if view.max_drop is not None else ""
            ax.axhline(view.budget * scale, color=BUDGET_COLOUR, ls="--", lw=1.3, zorder=2,
                       label=f"budget: ≥ {view.budget * scale:.4g}{'%' if scale == 100 else ''}{drop}")
        xs = [p[1] for p in points]
        if xs and max(xs) / min(xs) > 8:
            _log_axis(ax.xaxis)
        ax.set_xlabel(_axis_label(view, x))
        ax.set_ylabel("top-1 accuracy, held-out (%)" if scale == 100 else "cosine similarity to the baseline")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _svg(fig, fig_id)


def latency_svg(view: ReportView, fig_id: str) -> str:
    """Per batch size, each model's median (marker) and p10–p90 range (bar); raw samples as dots."""
    styles = variant_styles(view)
    batches = view.batches
    rows = [r for r in view.rows if r.latency]
    names = [r.name for r in rows]
    height = 0.9 + 0.32 * len(rows)
    with _figure(max(WIDTH_IN, 3.6 * len(batches)), height) as fig:
        axes = fig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
        for ax, batch in zip(axes, batches):
            base = view.baseline.latency_at(batch) if view.baseline else None
            if base is not None and base.median is not None:
                ax.axvline(base.median, color=BASELINE_STYLE[0], ls=":", lw=1.2, zorder=1)
            for y, row in enumerate(rows):
                point = row.latency_at(batch)
                if point is None or point.median is None:
                    continue
                colour, marker = styles[row.name]
                if point.samples:
                    jitter = [y + ((i * 7919) % 23 - 11) / 60 for i in range(len(point.samples))]
                    ax.scatter(point.samples, jitter, s=5, color=colour, alpha=0.25, linewidths=0, zorder=2)
                if point.p10 is not None and point.p90 is not None:
                    ax.hlines(y, point.p10, point.p90, color=colour, lw=3.5, alpha=0.45, zorder=2)
                ax.scatter([point.median], [y], s=48, color=colour, marker=marker, edgecolor="white",
                           linewidth=0.7, zorder=3)
            ax.set_xlim(left=0)
            ax.set_title(f"batch {batch}" if batch else "batch not recorded", loc="left")
            ax.set_xlabel("latency per call (ms)")
            ax.grid(axis="y", visible=False)
        axes[0].set_yticks(range(len(rows)), [_text(n) for n in names])
        axes[0].invert_yaxis()
        return _svg(fig, fig_id)


def energy_svg(rows: Sequence[tuple[str, Any]], fig_id: str, label: str = "energy per inference (nJ)",
               colours: Mapping[str, str] | None = None) -> str:
    """Stacked compute and memory bars per model (or layer), low–high bounds as whiskers.

    ``rows`` are (name, Energy); totals without a split are drawn as one bar, in the model's colour.
    """
    names = [name for name, _ in rows]
    with _figure(WIDTH_IN, 0.9 + 0.32 * len(rows)) as fig:
        ax = fig.add_subplot()
        ys = range(len(rows))
        compute = [e.compute_nj if e.compute_nj is not None else 0.0 for _, e in rows]
        memory = [e.memory_nj if e.memory_nj is not None else 0.0 for _, e in rows]
        split = [e.compute_nj is not None and e.memory_nj is not None for _, e in rows]
        total_only = [0.0 if s else (e.total_nj or 0.0) for (_, e), s in zip(rows, split)]
        if any(split):
            ax.barh(ys, compute, color=COMPUTE_COLOUR, height=0.6, label="compute (MACs)")
            ax.barh(ys, memory, left=compute, color=MEMORY_COLOUR, height=0.6, label="memory (bytes moved)")
        if any(total_only):
            # alone, the bars are the models' totals in their colours; beside split bars, grey totals
            ax.barh(ys, total_only, height=0.6, label="total (no split recorded)" if any(split) else None,
                    color=[(colours or {}).get(n, "#999999") if not any(split) else "#999999" for n in names])
        bounds = [(y, e.low_nj, e.high_nj) for y, (_, e) in zip(ys, rows) if e.low_nj is not None
                  and e.high_nj is not None]
        if bounds:
            ax.errorbar([0.5 * (lo + hi) for _, lo, hi in bounds], [y for y, _, _ in bounds],
                        xerr=[0.5 * (hi - lo) for _, lo, hi in bounds], fmt="none", ecolor="#333333",
                        elinewidth=1, capsize=3, label="bounds (low–high)")
        ax.set_yticks(list(ys), [_text(n) for n in names])
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _svg(fig, fig_id)


def layers_svg(layers: Sequence[Mapping[str, Any]], fig_id: str) -> str:
    """Per layer: share of weights zeroed (sparsity) and of channels removed (structured), bit width as text."""
    names = [str(layer.get("name", f"layer {i + 1}")) for i, layer in enumerate(layers)]
    sparsity = [(number(layer.get("sparsity")) or 0.0) * 100 for layer in layers]
    structured = [(number(layer.get("structured_ratio")) or 0.0) * 100 for layer in layers]
    with _figure(WIDTH_IN, 0.9 + 0.36 * len(layers)) as fig:
        ax = fig.add_subplot()
        ys = list(range(len(layers)))
        ax.barh([y - 0.18 for y in ys], sparsity, height=0.36, color=SPARSITY_COLOUR, label="sparsity (weights zero)")
        ax.barh([y + 0.18 for y in ys], structured, height=0.36, color=STRUCTURED_COLOUR,
                label="structured ratio (channels removed)")
        for y, layer in zip(ys, layers):
            bits = layer.get("bits")
            ax.text(101, y, f"{bits}-bit" if number(bits) is not None else "fp32", va="center", fontsize=9,
                    color="#333333")
        ax.set_xlim(0, 110)
        ax.set_xticks([0, 25, 50, 75, 100])
        ax.set_yticks(ys, [_text(n) for n in names])
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("share of the layer (%); bit width at the right")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _svg(fig, fig_id)


def _x_value(row: Row, x: str) -> float | None:
    if x == "objective":
        return row.objective_value
    if x == "bytes":
        return row.file_bytes
    if x == "latency":
        return row.latency[0].median if row.latency else None
    if x == "energy":
        return row.energy.total_nj if row.energy else None
    raise ValueError(f"unknown axis {x!r}")


def _axis_label(view: ReportView, x: str) -> str:
    if x == "objective":
        x = view.objective or "objective"
    if x == "bytes":
        return "weights file size (bytes)"
    if x == "latency":
        batch = view.batches[0] if view.batches else ""
        return f"latency per call, median (ms){' at batch ' + batch if batch else ''}"
    if x == "energy":
        batch = energy_batch(view)
        return "energy per inference (nJ)" + (f" at batch {batch}" if batch else "")
    return f"{x} ({OBJECTIVE_UNITS.get(x, 'as reported')})"


def _log_axis(axis: Any) -> None:
    """Log scale with plain tick labels (2k, 5k, 10k) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
    axis.set_minor_formatter(NullFormatter())


def _compact(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _text(label: str) -> str:
    """A label matplotlib shows as written: no mathtext from '$', no legend-hiding leading '_'."""
    label = label.replace("$", r"\$")
    return "\u200b" + label if label.startswith("_") else label


@contextlib.contextmanager
def _figure(width: float, height: float) -> Iterator[Any]:
    # Figure + Agg canvas directly, never pyplot: no global figure registry, no GUI backend.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        yield fig


def _svg(fig: Any, fig_id: str) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", pad_inches=0.08, metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)  # inline SVG in HTML needs no namespace URLs
    prefix = f"{fig_id}-"
    text = re.sub(r'(\sid=")', r"\g<1>" + prefix, text)
    text = re.sub(r'(href="#)', r"\g<1>" + prefix, text)
    text = text.replace("url(#", f"url(#{prefix}")
    size = re.search(r'<svg[^>]*?width="([\d.]+)pt"', text)
    width_px = float(size.group(1)) * 4 / 3 if size else 800.0
    # Responsive: as wide as the page allows, never wider than drawn; height follows the viewBox.
    text = re.sub(r'<svg([^>]*?)\swidth="[^"]*"\s+height="[^"]*"',
                  rf'<svg\1 class="plot" style="max-width:{width_px:.0f}px" role="img" aria-labelledby="{fig_id}-cap"',
                  text, count=1)
    return text.strip()
