"""Markdown reports, the twin of the HTML page: the same tables, rendered from the ``report.json``
document (so ``nnopt report`` can rebuild them). They never compute anything new."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nnopt.metrics.table import markdown_table
from nnopt.report.document import ReportView, read_report
from nnopt.report.tables import (
    Table,
    energy_label,
    energy_table,
    latency_table,
    layers_table,
    smaller_not_faster,
    speed_notes,
    split_text_columns,
    variant_table,
)

if TYPE_CHECKING:
    from nnopt.pipeline.classic import ClassicResult

CLASSIC_KIND = "classic-demo"


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md for any run: the demo's own text for a demo report, the generic tables otherwise."""
    view = read_report(report)
    if view.kind == CLASSIC_KIND:
        try:
            return render_classic_markdown(report)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            pass  # a hand-edited or partial demo report: the generic tables still render what is there
    return _render_generic(view)


def render_classic_markdown(result: ClassicResult | Mapping[str, Any]) -> str:
    """The demo's report.md, from its result or from its ``report.json`` document."""
    report = result if isinstance(result, Mapping) else result.to_report()
    env, cfg, dataset = report["environment"], report["config"], report["dataset"]
    variants = report["variants"]
    columns, rows = _measurement_rows(variants)
    columns.append("compute path")
    for row, variant in zip(rows, variants):
        row.append(variant.get("compute", "-"))
    base = variants[0]
    lines = [
        "# nnopt demo: the classic SimpleNet",
        "",
        f"SimpleNet (Dense 64 ReLU → Dense 32 ReLU → Dense 10 softmax) trained for {cfg['epochs']} epochs "
        f"with Adam (lr {cfg['lr']}) and cross-entropy on scikit-learn digits "
        f"({dataset['train']} train / {dataset['test']} test rows, stratified, seed {cfg['seed']}); "
        f"then pruned with |w| < θ = {cfg['threshold']} → 0 and quantized with w_q = round(w·S), "
        f"symmetric {cfg['bits']}-bit codes per tensor. The gradual variants prune to {cfg['sparsity']:.0%} of the "
        f"hidden layers' weights (global magnitude, cubic schedule over {cfg['gradual_epochs']} epochs of fine-tuning) "
        "and are saved in nnopt's packed format, which stores only the non-zeros.",
        "",
        f"Device: {env['device']} ({env['cpu']}), {env['threads']} threads; torch {env['torch']}; "
        f"nnopt {env['nnopt']}.",
        "",
        markdown_table(columns, rows),
        "",
        "## What changed, against the baseline",
        "",
    ]
    for m in variants[1:]:
        acc = (m["accuracy"] - base["accuracy"]) * 100 if m["accuracy"] is not None and base["accuracy"] is not None \
            else None
        ratio = base["file_bytes"] / m["file_bytes"] if m["file_bytes"] and base["file_bytes"] else None
        zero = 1 - m["nonzeros"] / m["params"]
        lines.append(
            f"- **{m['name']}**: accuracy {_signed(acc)} points; weights file {m['file_bytes']:,} bytes "
            f"({_times(ratio)} smaller than {base['file_bytes']:,}); "
            f"{zero:.1%} of parameters (weights and biases) are zero; {_speed_note(base, m)}."
        )
    lines += [
        "",
        "Plainly: pruning does not shrink a safetensors file, because its zeros are stored densely; the",
        "packed format stores only the non-zeros and their positions. No variant is faster where it",
        "computes with a dense fp32 kernel (the quantized ones also dequantize their codes on each call),",
        "unless the compute path names a sparse (csr) kernel: those are chosen per layer only where measured",
        "faster than dense on this machine at batch 1, with the measurement shown.",
        "Latency differences between them are noise or that overhead, not a speed-up.",
        "The structured-50 variant is different: its hidden layers are physically half as wide, a smaller",
        "dense model with fewer MACs; at SimpleNet's size the per-call overhead still dominates its latency",
        "(benchmarks/structured.py measures the CNN and MiniLM, where the removed work shows).",
        "The int8-static and QAT variants do multiply with int8 GEMMs, yet at 64 features the passes that",
        "quantize inputs and rescale outputs cost more than the narrower multiply saves; int8 pays off on",
        "wide layers (benchmarks/quantization.py: a 4096×4096 Linear, MiniLM through ONNX Runtime).",
        "",
        "## Energy per inference (estimated)",
        "",
        *_demo_energy(variants),
        "## How each figure was obtained",
        "",
    ]
    lines += [f"- `{key}`: {text}" for key, text in report.get("methods", {}).items()]
    batches = ", ".join(_batches(variants)) or "-"
    lines += [f"- latency batch sizes: {batches}; threads: {env['threads']}", ""]
    return "\n".join(lines)


def _render_generic(view: ReportView) -> str:
    env = view.environment
    facts = [f"{k}: {_md(str(v))}" for k, v in (("device", view.get("device")), ("CPU", view.get("cpu")),
                                      ("threads", view.get("threads")), ("torch", view.get("torch")),
                                      ("nnopt", view.get("nnopt_version", "nnopt")), ("Python", env.get("python")),
                                      ("date", view.get("date", "created", "timestamp"))) if v not in (None, "")]
    lines = [f"# {_md(view.title)}", "", ("; ".join(facts) or "No environment recorded") + ".", ""]
    if view.doc.get("message"):
        lines += [_md(str(view.doc["message"])), ""]
    if view.front:
        chosen = next((r for r in view.front if r.chosen), None)
        budget = f"{view.metric} ≥ {view.budget:.4g}" if view.budget is not None else "not recorded"
        lines += [f"Objective: {view.objective or 'not recorded'}; budget: {budget}; "
                  f"chosen plan: {_md(chosen.name) if chosen else 'none (no plan met the budget; baseline kept)'}.",
                  ""]
    slow = smaller_not_faster(view)
    if slow:
        lines += [f"**Smaller but not faster on this device** ({_md(str(view.device))}, {_md(str(view.threads))}): "
                  f"{_md(', '.join(slow))}. Their files are smaller, yet their measured median latency is no lower "
                  "at any batch size (within ±5% counts as the same).", ""]
    notes = speed_notes(view)
    if notes:
        lines += ["## Against the baseline", ""] + [f"- **{_md(n)}**: {t}." for n, t in notes] + [""]
    figures, text = split_text_columns(variant_table(view))
    lines += ["## Every variant", "", *_table(figures, view), ""]
    if text is not None:
        lines += ["### What each variant is", "", *_table(text, view), ""]
    if view.front and view.front != view.rows[-len(view.front):]:
        figures, text = split_text_columns(variant_table(view, view.front))
        lines += ["## Plans on the front", "", *_table(figures, view), ""]
        if text is not None:
            lines += [*_table(text, view), ""]
    if any(r.latency for r in view.rows):
        batches = ", ".join(b for b in view.batches if b) or "not recorded"
        lines += ["## Latency (measured)", "", f"Wall-clock per call on {_md(str(view.device))}, "
                  f"{_md(str(view.threads))}, batch {_md(batches)}.", "", *_table(latency_table(view), view), ""]
    energies = [r.energy for r in view.rows if r.energy]
    if energies:
        labels = "; ".join(sorted({energy_label(e.method) for e in energies}))
        lines += [f"## Energy per inference: {_md(labels)}", "", *_table(energy_table(view), view), ""]
    if view.layers:
        lines += ["## Per-layer sparsity and bits (counted)", "", *_table(layers_table(view), view), ""]
    methods = view.doc.get("methods")
    if isinstance(methods, Mapping) and methods:
        lines += ["## How each figure was obtained", ""] + [f"- {_md(str(k))}: {_md(str(v))}"
                                                            for k, v in methods.items()] + [""]
    return "\n".join(lines)


def _table(table: Table, view: ReportView) -> list[str]:
    tags = {r.name: " (chosen)" if r.chosen else " (baseline)" if r.is_baseline and r.name != "baseline" else ""
            for r in view.rows + view.front}
    rows = [[_md(cells[0]) + tags.get(name, ""), *(_md(c) for c in cells[1:])]
            for name, cells in zip(table.names, table.rows)]
    return [markdown_table([_md(c) for c in table.columns], rows), *(f"\n{_md(n)}" for n in table.notes)]


def _md(text: str) -> str:
    """A table cell or name as literal text: pipes, markup and HTML characters escaped."""
    for char in ("\\", "|", "*", "_", "`", "<", ">", "[", "]"):
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def _measurement_rows(variants: list[dict[str, Any]]) -> tuple[list[str], list[list[object]]]:
    """The demo's table: the columns of ``nnopt.metrics.measurement_rows``, from report.json entries."""
    batches = _batches(variants)
    columns = ["variant", "accuracy", "params", "non-zeros", "MACs", "file bytes", "ratio"]
    columns += [f"ms @{b} (median / p90)" for b in batches]
    rows = []
    for m in variants:
        ratio = f"{m['compression_ratio']:.1f}×" if m.get("compression_ratio") else "-"
        row: list[object] = [m["name"], m["accuracy"], m["params"], m["nonzeros"], m["macs"], m["file_bytes"], ratio]
        for b in batches:
            t = (m.get("latency_ms") or {}).get(b)
            row.append(f"{t['median']:.3f} / {t['p90']:.3f}" if t else "-")
        rows.append(row)
    return columns, rows


def _batches(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    found = {b for v in variants for b in (v.get("latency_ms") or {})}
    return sorted(found, key=lambda b: int(b) if b.isdigit() else 0)


def _speed_note(base: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    if not base.get("latency_ms") or not other.get("latency_ms"):
        return "latency not measured"
    parts = []
    for batch in _batches([base]):
        mine = other["latency_ms"].get(batch)
        if mine:
            ratio = base["latency_ms"][batch]["median"] / mine["median"]
            parts.append(f"{ratio:.2f}× baseline speed at batch {batch}")
    return "measured " + ", ".join(parts)


def _signed(value: float | None) -> str:
    return f"{value:+.1f}" if value is not None else "n/a"


def _times(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "n/a×"


def _demo_energy(variants: list[dict[str, Any]]) -> list[str]:
    """The demo's energy section: power × measured time (this version), or an older report's analytic figures,
    each described as what it is."""
    energies = [(v["name"], e) for v in variants if (e := v.get("energy_nj"))]
    if any("active power × measured time" in str(e.get("method", "")) for _, e in energies):
        text = [
            "No energy counter on this machine, so every figure here is estimated: the CPU's active power (its TDP",
            "share for the threads used, × 0.5–1.0: the bounds) × the variant's measured time per inference. The",
            "power is the same for every variant, so energy orders them as their latencies do: a slower kernel is",
            "never cheaper, however few picojoules its multiplies take. Compute and memory split each total by",
            "the shares of the analytic table (MACs executed × pJ per MAC + bytes moved × pJ per byte, Horowitz,",
            "ISSCC 2014, 45 nm), which counts arithmetic and data movement only and so never ranks on its own.",
        ]
        unit, scale = "µJ", 1e3
    else:  # a report written by an earlier nnopt: the analytic table's own figures
        text = [
            "Figures from the analytic table alone (an older report): the MACs each variant's kernel executes ×",
            "pJ per MAC of its dtype + bytes moved × pJ per byte (Horowitz, ISSCC 2014, 45 nm). They count",
            "arithmetic and data movement only and ignore time, so a slower variant can show less energy here.",
        ]
        unit, scale = "nJ", 1.0
    rows = [[name, _sig(e.get("compute_nj"), scale), _sig(e.get("memory_nj"), scale), _sig(e.get("total_nj"), scale),
             f"{_sig(e.get('low_nj'), scale)}–{_sig(e.get('high_nj'), scale)}"] for name, e in energies]
    return [*text, "", markdown_table(["variant", f"compute {unit}", f"memory {unit}", f"total {unit}",
                                        f"bounds {unit}"], rows), ""]


def _sig(value: Any, scale: float) -> str:
    """``value`` ÷ ``scale`` to 4 significant figures ("-" where absent): readable at any power level."""
    return "-" if value is None else f"{value / scale:.4g}"
