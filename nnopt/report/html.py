"""The HTML report: one self-contained file (inline CSS and SVG; no scripts, fonts or URLs to fetch).

Rendered from the ``report.json`` document alone, so that ``nnopt report RUN_DIR`` can rebuild it.
Every figure's caption says whether it was measured, estimated or counted, on which device, with how
many threads, at which batch size; every string from the document is escaped.
"""

from __future__ import annotations

import datetime
import html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from nnopt.io.atomic import atomic_write_bytes
from nnopt.report.document import OBJECTIVE_PHRASES, REPORT_HTML, REPORT_JSON, REPORT_MD, ReportView, read_report
from nnopt.report.tables import (
    Table,
    energy_batch,
    energy_label,
    energy_table,
    in_points,
    latency_table,
    layer_energies,
    layers_table,
    smaller_not_faster,
    speed_notes,
    split_text_columns,
    variant_table,
)


def render_html(report: Mapping[str, Any], *, date: str | None = None) -> str:
    """The report page of a run's ``report.json`` document.

    ``date`` is shown when the document records none (``write_reports`` passes when report.json
    was written). Raises :class:`~nnopt.errors.ModelFormatError` for a document it cannot read.

    >>> page = render_html(json.loads(Path("nnopt-report/report.json").read_text()))  # doctest: +SKIP
    """
    from nnopt.report import plots

    view = read_report(report)
    styles = plots.variant_styles(view)
    sections = [
        _header(view, date),
        _summary(view),
        _section("variants", "Every variant", _variants(view, styles)),
    ]
    if view.front:
        body = _tradeoff(view, plots, "objective")
        if view.front != view.rows[-len(view.front):]:  # the table above is not the front: show the plans too
            figures, text = split_text_columns(variant_table(view, view.front))
            body += "<h3>Plans on the front</h3>" + _table(figures, view, styles)
            body += _table(text, view, styles) if text is not None else ""
        sections.append(_section("front", "Pareto front", body))
    elif any(r.accuracy is not None and r.file_bytes for r in view.rows):
        sections.append(_section("size", "Accuracy against size", _tradeoff(view, plots, "bytes")))
    if any(r.latency for r in view.rows):
        body = _figure(plots.latency_svg(view, "fig-latency"), "fig-latency", *_latency_caption(view))
        sections.append(_section("latency", "Latency", body + _details("Latency as a table",
                                                                      _table(latency_table(view), view, styles))))
    if any(r.energy for r in view.rows):
        sections.append(_section("energy", "Energy per inference", _energy(view, plots, styles)))
    if view.layers:
        body = _figure(plots.layers_svg(view.layers, "fig-layers"), "fig-layers", "counted",
                       f"Per layer, as recorded in the report{' for the chosen plan' if view.front else ''}: "
                       "the share of weights that are zero (sparsity), the share of channels removed "
                       "(structured ratio) and the bit width of the stored weights. Counted, not measured: "
                       "independent of device, threads and batch size.")
        sections.append(_section("layers", "Per-layer sparsity and bits",
                                 body + _table(layers_table(view), view, styles)))
    sections.append(_section("methods", "How each figure was obtained", _methods(view)))
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(view.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
        f"<footer>Written by nnopt {_e(str(view.get('nnopt_version', 'nnopt') or '?'))}. This page is one "
        "self-contained file: it loads nothing from anywhere.</footer>\n</main>\n</body>\n</html>\n"
    )


def write_reports(run_dir: Path, report: Mapping[str, Any]) -> None:
    """Write ``report.html`` and ``report.md`` into the existing directory ``run_dir``, each atomically."""
    from nnopt.report.markdown import render_markdown

    run_dir = Path(run_dir)
    page = render_html(report, date=_written(run_dir / REPORT_JSON))
    text = render_markdown(report)
    atomic_write_bytes(run_dir / REPORT_HTML, page.encode())
    atomic_write_bytes(run_dir / REPORT_MD, text.encode())


def _written(path: Path) -> str:
    """When report.json was written (the run's end), else now: the date a report without one shows."""
    try:
        stamp = path.stat().st_mtime
    except OSError:
        stamp = datetime.datetime.now(datetime.timezone.utc).timestamp()
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- sections ----------------------------------------------------------------------------------------------


def _header(view: ReportView, date: str | None) -> str:
    env = view.environment
    dataset = view.doc.get("dataset")
    facts = [
        ("device", view.device), ("CPU", view.get("cpu")), ("threads", view.get("threads")),
        ("GPU", view.get("gpu")), ("torch", view.get("torch")), ("nnopt", view.get("nnopt_version", "nnopt")),
        ("Python", env.get("python")),
        ("date", view.get("date", "created", "timestamp") or (f"{date} (report.json written)" if date else None)),
    ]
    if isinstance(dataset, Mapping):
        rows = ", ".join(f"{dataset[k]:,} {k}" for k in ("train", "test") if isinstance(dataset.get(k), int))
        facts.append(("data", f"{dataset.get('name', '?')}{f' ({rows} rows)' if rows else ''}"))
    items = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(_plain(v))}</dd></div>" for k, v in facts if v not in (None, ""))
    return (f"<header>\n<p class=\"eyebrow\">nnopt report · {_e(view.kind)}</p>\n<h1>{_e(view.title)}</h1>\n"
            f"<p class=\"lede\">{_e(_what_ran(view))}</p>\n<dl class=\"facts\">{items}</dl>\n</header>")


def _what_ran(view: ReportView) -> str:
    doc = view.doc
    config = cast(Mapping[str, Any], doc.get("config")) if isinstance(doc.get("config"), Mapping) else {}
    if doc.get("description"):
        return str(doc["description"])
    if view.kind == "classic-demo":
        epochs = config.get("epochs", "?")
        return (f"SimpleNet (Dense 64 → 32 → 10) trained for {epochs} epoch{'' if epochs == 1 else 's'} on "
                f"scikit-learn digits, pruned with |w| < θ = {config.get('threshold', '?')}, quantized to "
                f"{config.get('bits', '?')} bits, and {len(view.rows) - 1} variants in all measured side by side "
                "in one process against the baseline.")
    if view.front:
        drop = in_points(view.max_drop) if view.max_drop is not None else "the budget"
        model = view.get("model", "model_path", "input")
        if isinstance(model, Mapping):  # {"architecture": ..., "applied": [...]}
            applied = ", ".join(map(str, model.get("applied") or ()))
            model = f"{model.get('architecture', 'the model')}{f' ({applied} applied)' if applied else ''}"
        chosen = next((r.name for r in view.front if r.chosen), None)
        best = OBJECTIVE_PHRASES.get(view.objective or "", (f"the best {view.objective or 'objective'}", ""))[0]
        return (f"Searched optimization plans{f' for {model}' if model else ''} for {best} "
                f"whose {view.metric} stays within {drop} of the baseline; "
                f"{len(view.front)} plans on the front; chosen: {chosen or 'none (no plan met the budget)'}.")
    return str(doc.get("command") or f"a {view.kind} run")


def _summary(view: ReportView) -> str:
    parts = [f"<p class=\"message\">{_e(str(view.doc['message']))}</p>"] if view.doc.get("message") else []
    if view.front:
        chosen = next((r for r in view.front if r.chosen), None)
        if chosen is None:
            parts.append("<p class=\"callout warn\"><strong>No plan met the budget.</strong> The baseline is kept: "
                         "every plan on the front lost more than the allowed accuracy.</p>")
        else:
            parts.append(f"<p class=\"callout good\"><strong>Chosen plan: {_e(chosen.name)}.</strong> "
                         f"{_e(_chosen_text(view, chosen))}</p>")
    slow = smaller_not_faster(view)
    if slow:
        parts.append(
            f"<p class=\"callout warn\"><strong>Smaller but not faster on this device</strong> ({_e(view.device)}, "
            f"{_e(view.threads)}): {_e(', '.join(slow))}. Their files are smaller than the baseline's, yet their "
            f"measured median latency is no lower at any batch size (within ±5% counts as the same). "
            "Fewer bytes on disk is the gain; speed is not.</p>")
    notes = speed_notes(view)
    if notes:
        items = "".join(f"<li><strong>{_e(name)}</strong>: {_e(text)}.</li>" for name, text in notes)
        named = f" ({_e(view.baseline.name)})" if view.baseline and view.baseline.name != "baseline" else ""
        parts.append(f"<p>Against the baseline{named}, as measured:</p>"
                     f"<ul class=\"notes\">{items}</ul>")
    return _section("summary", "Summary", "\n".join(parts) or "<p>Nothing to compare: the report has no baseline.</p>")


def _variants(view: ReportView, styles: Mapping[str, tuple[str, str]]) -> str:
    figures, text = split_text_columns(variant_table(view))
    body = _table(figures, view, styles)
    if text is not None:
        body += "<h3>What each variant is</h3>" + _table(text, view, styles)
    return body


def _chosen_text(view: ReportView, chosen: Any) -> str:
    base = view.baseline
    parts = []
    if chosen.accuracy is not None:
        text = f"{view.metric} {chosen.accuracy:.4g}"
        if base is not None and base.accuracy is not None:
            text += f" ({(chosen.accuracy - base.accuracy) * 100:+.2f} points against the baseline)"
        parts.append(text)
    if chosen.objective_value is not None:
        noun, unit = _OBJECTIVE_NOUNS.get(view.objective or "", (view.objective or "objective", ""))
        text = f"{noun}: {chosen.objective_value:,.4g} {unit}".rstrip()
        if base is not None and base.objective_value:
            ratio = base.objective_value / chosen.objective_value
            comparative = OBJECTIVE_PHRASES.get(view.objective or "", ("", "better"))[1]
            text += f" ({ratio:.2f}× {comparative} than the baseline's)" if ratio >= 1 else \
                f" ({1 / ratio:.2f}× the baseline's)"
        parts.append(text)
    if view.budget is not None:
        parts.append(f"budget: {view.metric} ≥ {view.budget:.4g}")
    return "; ".join(parts) + "."


_OBJECTIVE_NOUNS = {"bytes": ("weights file", "bytes"), "latency": ("latency", "ms"),
                    "energy": ("energy", "nJ per inference")}


def _tradeoff(view: ReportView, plots: Any, x: str) -> str:
    svg = plots.tradeoff_svg(view, x, f"fig-{x}")
    test_rows = (view.doc.get("dataset") or {}).get("test") if isinstance(view.doc.get("dataset"), Mapping) else None
    splits = {str(r.data["split"]) for r in (view.front or view.rows) if r.data.get("split")}
    if len(splits) == 1:  # e.g. an auto run scores its plans on a validation split, not the test split
        held_out = f"the {splits.pop()} split"
    else:
        held_out = f"the held-out test split ({test_rows:,} rows)" if isinstance(test_rows, int) else "held-out data"
    where = f"{view.device} ({view.get('cpu') or 'CPU not recorded'}), {view.threads}"
    if x == "bytes":
        caption = (f"Measured: {view.metric} on {held_out}; size: bytes of the weights file as written. {where}; "
                   "neither figure depends on the batch size. Up and to the left is better.")
        return _figure(svg, f"fig-{x}", "measured", caption)
    objective = view.objective or "objective"
    how, badge = "measured size of the weights file as written (independent of batch size)", "measured"
    if objective == "latency":
        batch = view.batches[0] if view.batches else ""
        how = f"measured: median wall-clock per call at batch {batch or 'not recorded'}"
    elif objective == "energy":
        energies = [r.energy for r in view.rows if r.energy]
        label = energy_label(energies[0].method if energies else None)
        batch = energy_batch(view)
        how, badge = f"{label}, per inference at batch {batch or 'not recorded'}", label.split(" ")[0]
    caption = (f"{view.metric.capitalize()} measured on {held_out}; {objective}: {how}. {where}. Grey line: the "
               "Pareto front (no plan is better on both axes); ring: the chosen plan; dashed red line: the budget.")
    return _figure(svg, f"fig-{x}", badge, caption)


def _latency_caption(view: ReportView) -> tuple[str, str]:
    method = view.method("latency_ms") or next(
        (str(r.data["latency_method"]) for r in view.rows if r.data.get("latency_method")), None)
    detail = (method or "wall-clock time per forward call").removeprefix("measured: ")
    batches = ", ".join(b for b in view.batches if b) or "not recorded"
    return "measured", (
        f"Measured on {view.device} ({view.get('cpu') or 'CPU not recorded'}), {view.threads}, batch {batches}: "
        f"{detail}. Marker: median; bar: 10th to 90th percentile; dotted line: the baseline's median. "
        "Lower is faster.")


def _energy(view: ReportView, plots: Any, styles: Mapping[str, tuple[str, str]]) -> str:
    rows = [(r.name, r.energy) for r in view.rows if r.energy]
    methods = {e.method for _, e in rows}
    labels = sorted({energy_label(m) for m in methods})
    badge = "measured" if all(label.startswith("measured") for label in labels) else "estimated"
    where = (f"for {view.device} ({view.get('cpu') or 'CPU not recorded'}), {view.threads}, per inference at "
             f"batch {energy_batch(view) or 'not recorded'}")
    split = _energy_parts([e for _, e in rows])
    not_measured = "" if badge == "measured" else "Not measured: no energy counter produced these figures."
    caption = f"{_upper_first('; '.join(labels))} {where}. {split}{not_measured}"
    colours = {name: style[0] for name, style in styles.items()}
    body = _figure(plots.energy_svg(rows, "fig-energy", colours=colours), "fig-energy", badge, caption)
    body += _table(energy_table(view), view, styles)
    per_layer = layer_energies(view)
    if per_layer:
        layer_labels = sorted({energy_label(e.method) for _, e in per_layer})
        layer_badge = "measured" if all(x.startswith("measured") for x in layer_labels) else "estimated"
        whose = " of the chosen plan" if view.front else ""
        svg = plots.energy_svg(per_layer, "fig-layer-energy", "energy per inference, per layer (nJ)")
        body += "<h3>Per layer</h3>" + _figure(svg, "fig-layer-energy", layer_badge,
                        f"{_upper_first('; '.join(layer_labels))}, per layer{whose}, {where}. "
                        f"{_energy_parts([e for _, e in per_layer])}")
    return body


def _energy_parts(energies: list[Any]) -> str:
    """What the bars and whiskers of an energy figure stand for, as far as the figures have them."""
    text = ""
    if any(e.compute_nj is not None and "active power × measured time" in (e.method or "") for e in energies):
        text += ("Total: the device's active power × the measured time; compute and memory split it by the shares "
                 "of the analytic table (MACs executed × pJ per MAC, bytes moved × pJ per byte). ")
    elif any(e.compute_nj is not None for e in energies):
        text += ("Compute: the multiply-accumulates the kernel executes × energy per MAC of its dtype; memory: "
                 "bytes moved × energy per byte of the memory level they come from. ")
    if any(e.low_nj is not None for e in energies):
        text += "Whiskers: the low–high bounds. "
    return text


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _methods(view: ReportView) -> str:
    methods = view.doc.get("methods")
    parts = []
    if isinstance(methods, Mapping) and methods:
        items = "".join(f"<li><code>{_e(str(k))}</code>: {_method_html(str(v))}</li>" for k, v in methods.items())
        parts.append(f"<ul class=\"methods\">{items}</ul>")
    else:
        parts.append("<p>The report records no method per figure; the captions above say what is known.</p>")
    parts.append(f"<p>Speed comparisons count a median within ±5% of the baseline's as the same speed. "
                 f"Device: {_e(view.device)}; {_e(view.threads)}.</p>")
    env = view.environment
    if env:
        rows = "".join(f"<tr><th scope=\"row\">{_e(str(k))}</th><td>{_e(_plain(v))}</td></tr>" for k, v in env.items())
        parts.append(_details("Environment", f"<table class=\"kv\"><tbody>{rows}</tbody></table>"))
    config = view.doc.get("config")
    if isinstance(config, Mapping):
        parts.append(_details("Configuration", f"<pre>{_e(json.dumps(config, indent=2, default=str))}</pre>"))
    return "\n".join(parts)


# -- pieces ------------------------------------------------------------------------------------------------


def _section(section_id: str, title: str, body: str) -> str:
    return f"<section id=\"{section_id}\">\n<h2>{_e(title)}</h2>\n{body}\n</section>"


def _figure(svg: str, fig_id: str, badge: str, caption: str) -> str:
    return (f"<figure id=\"{fig_id}\">\n{svg}\n<figcaption id=\"{fig_id}-cap\">{_badge(badge)}{_e(caption)}"
            "</figcaption>\n</figure>")


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>\n{body}\n</details>"


def _badge(kind: str) -> str:
    css = kind if kind in ("measured", "estimated", "counted") else "other"
    return f"<span class=\"badge {css}\">{_e(kind)}</span> "


def _method_html(method: str) -> str:
    """A method text with its leading "measured"/"estimated"/"counted" shown as a badge."""
    found = re.match(r"\s*(measured|estimated|counted)\b:?\s*", method, flags=re.I)
    if found:
        return _badge(found.group(1).lower()) + _e(method[found.end():])
    return _e(method)


def _table(table: Table, view: ReportView, styles: Mapping[str, tuple[str, str]]) -> str:
    if not table.rows:
        return ""
    tags = {r.name: ("chosen" if r.chosen else "baseline" if r.is_baseline else "") for r in view.rows + view.front}
    head = "".join(f"<th scope=\"col\"{_NUM if num else ''}>{_e(c)}</th>"
                   for c, num in zip(table.columns, table.numeric))
    body = []
    for name, cells in zip(table.names, table.rows):
        tag = tags.get(name, "")
        colour = styles.get(name, ("", ""))[0]
        swatch = f"<span class=\"swatch\" style=\"background:{colour}\"></span>" if colour else ""
        label = f" <span class=\"tag {tag}\">{tag}</span>" if tag else ""
        first = f"<th scope=\"row\">{swatch}<span class=\"name\">{_e(cells[0])}</span>{label}</th>"
        rest = "".join(f"<td{_NUM if num else ''}>{_cell(c, num)}</td>" for c, num in zip(cells[1:], table.numeric[1:]))
        row_class = f' class="{tag}"' if tag else ""
        body.append(f"<tr{row_class}>{first}{rest}</tr>")
    notes = "".join(f"<p class=\"note\"><strong>{_e(label)}</strong>: {_method_html(text)}</p>"
                    for label, _, text in (n.partition(": ") for n in table.notes))
    return (f"<div class=\"scroll\"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body)
            + f"\n</tbody>\n</table></div>{notes}")


_NUM = ' class="num"'


def _cell(text: str, numeric: bool) -> str:
    # A figure with its range or parts, "0.036 (0.035–0.037)": the range goes small, under the figure.
    found = re.fullmatch(r"(\S+) \((.+)\)", text) if numeric else None
    if found:
        return f"{_e(found.group(1))}<span class=\"range\">{_e(found.group(2))}</span>"
    if "\n" in text:  # a recipe in YAML: keep its lines
        return f"<pre class=\"cell\">{_e(text.strip())}</pre>"
    return _e(text)


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    return str(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


_CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dde1e8; --bg: #f5f6f8; --card: #ffffff;
  --accent: #3b75af; --good: #1e7a3c; --good-bg: #e4f4e8; --warn: #8a5300; --warn-bg: #fdf0d8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); line-height: 1.5;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 24px 48px; }
header { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 22px 26px;
  border-top: 5px solid var(--accent); }
.eyebrow { margin: 0; color: var(--muted); font-size: 12px; letter-spacing: .08em; text-transform: uppercase; }
h1 { margin: 4px 0 8px; font-size: 26px; line-height: 1.25; }
h3 { margin: 18px 0 6px; font-size: 15px; }
h2 { margin: 0 0 14px; font-size: 19px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
.lede { margin: 0 0 14px; color: #333a48; max-width: 70em; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 8px 18px; margin: 0; }
.facts div { min-width: 0; }
.facts dt { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.facts dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 20px 26px;
  margin-top: 18px; }
.callout { border-radius: 8px; padding: 10px 14px; margin: 0 0 12px; }
.callout.warn { background: var(--warn-bg); color: #4d3200; border-left: 4px solid #e39b1b; }
.callout.good { background: var(--good-bg); color: #123d20; border-left: 4px solid #2f9a51; }
.notes li { margin: 2px 0; }
.scroll { overflow-x: auto; margin: 6px 0 8px; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
thead th { position: sticky; top: 0; background: #eef1f5; color: #333a48; font-weight: 600; text-align: left;
  padding: 8px 8px; border-bottom: 1px solid var(--line); vertical-align: bottom; min-width: 4.5em; }
td, tbody th { padding: 6px 8px; border-bottom: 1px solid #edf0f3; vertical-align: top; text-align: left; }
tbody th { font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr.baseline { background: #f0f1f3; }
tbody tr.chosen { background: #e8f4ec; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th.num { white-space: normal; }
.range { display: block; font-size: 11.5px; color: var(--muted); }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 7px; }
.tag { font-size: 11px; font-weight: 600; padding: 1px 6px; border-radius: 9px; margin-left: 4px;
  background: #dfe3e9; color: #333a48; }
.tag.chosen { background: #2f9a51; color: #fff; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0; }
figure { margin: 8px 0 16px; }
svg.plot { display: block; width: 100%; height: auto; margin: 0 auto; }
figcaption { color: #3d4453; font-size: 13.5px; margin-top: 8px; max-width: 75em; }
.badge { display: inline-block; font-size: 11px; font-weight: 700; text-transform: uppercase; letter-spacing: .04em;
  padding: 1px 7px; border-radius: 9px; margin-right: 4px; vertical-align: 1px; }
.badge.measured { background: var(--good-bg); color: var(--good); }
.badge.estimated { background: var(--warn-bg); color: var(--warn); }
.badge.counted, .badge.other { background: #e6ecf5; color: #2d4f7c; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); font-weight: 600; }
.methods li { margin: 4px 0; }
.kv th { width: 14em; color: var(--muted); font-weight: 600; }
pre.cell { margin: 0; padding: 4px 6px; font-size: 12px; background: transparent; }
.message { font-size: 15.5px; margin: 0 0 12px; }
pre { background: #f3f5f8; padding: 10px 12px; border-radius: 6px; overflow-x: auto; font-size: 12.5px; }
code { font-size: 13px; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 22px; text-align: center; }
@media print { body { background: #fff; } section, header { break-inside: avoid; border-color: #ccc; } }
"""
