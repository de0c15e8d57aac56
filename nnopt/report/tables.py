"""Tables and notes shared by the HTML page, its Markdown twin and the plots: the same rows, labels and
comparisons with the baseline everywhere, built from a :class:`~nnopt.report.document.ReportView`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from nnopt.report.document import OBJECTIVE_UNITS, Energy, LatencyPoint, ReportView, Row, _energy, _number

SAME_SPEED = 0.05  # a median within ±5% of the baseline's is the same speed: timing noise, not a speed-up


def speed_notes(view: ReportView) -> list[tuple[str, str]]:
    """One plain sentence per model against the baseline: accuracy, size, and whether it is faster.

    A smaller model that is not faster says so; "faster" means a median latency at least
    :data:`SAME_SPEED` below the baseline's at some batch size measured for both.
    """
    base = view.baseline
    if base is None:
        return []
    notes = []
    for row in view.rows:
        if row.is_baseline:
            continue
        parts = []
        if row.accuracy is not None and base.accuracy is not None:
            parts.append(f"{view.metric} {(row.accuracy - base.accuracy) * 100:+.1f} points")
        smaller = _smaller(row, base)
        if row.file_bytes and base.file_bytes:
            if smaller:
                parts.append(f"file {base.file_bytes / row.file_bytes:.2f}× smaller "
                             f"({row.file_bytes:,.0f} vs {base.file_bytes:,.0f} bytes)")
            else:
                parts.append(f"file not smaller ({row.file_bytes:,.0f} vs {base.file_bytes:,.0f} bytes)")
        ratios = speed_ratios(row, base)
        if ratios:
            where = "speed against the baseline " + ", ".join(f"{r:.2f}×{_at(b)}" for b, r in ratios)
            if any(r >= 1 + SAME_SPEED for _, r in ratios):
                parts.append(f"faster: {where} (measured)")
            elif smaller:
                parts.append(f"smaller but not faster here: {where} (measured)")
            else:
                parts.append(f"not faster: {where} (measured)")
        notes.append((row.name, "; ".join(parts) or "nothing to compare with the baseline"))
    return notes


def smaller_not_faster(view: ReportView) -> list[str]:
    """Names of the models whose file is smaller than the baseline's but whose latency is not lower."""
    base = view.baseline
    if base is None:
        return []
    return [r.name for r in view.rows if not r.is_baseline and _smaller(r, base)
            and (ratios := speed_ratios(r, base)) and all(x < 1 + SAME_SPEED for _, x in ratios)]


def speed_ratios(row: Row, base: Row) -> list[tuple[str, float]]:
    """(batch, baseline median / this median) for each batch measured for both."""
    out = []
    for point in row.latency:
        ref = base.latency_at(point.batch)
        if ref and ref.median and point.median:
            out.append((point.batch, ref.median / point.median))
    return out


def energy_label(method: str | None) -> str:
    """Short label of how an energy figure was obtained, from its method text."""
    if not method:
        return "method not recorded"
    text = method.strip()
    if "active power × measured time" in text:  # nnopt.energy.device_energy: the time-aware figure
        return f"{'measured' if text.lower().startswith('measured') else 'estimated'} (power × measured time)"
    if text.lower().startswith("measured"):
        counters = [c for c in ("RAPL", "NVML") if c.lower() in text.lower()]
        return f"measured ({'/'.join(counters) or 'RAPL/NVML'})"
    table = re.search(r"analytic table \(?([\w.\-]+)", text)
    if table:
        return f"estimated (analytic, {table.group(1)})"
    if "latency" in text.lower():
        return "estimated (latency × power share)"
    return "estimated" if text.lower().startswith("estimated") else text.split(":")[0]


def energy_batch(view: ReportView) -> str:
    """The batch size the energy figures are per inference at, when the report says ("" if not)."""
    texts = [r.energy.method or "" for r in view.rows if r.energy] + [view.method("energy_nj") or ""]
    batches = {b for b in (r.data.get("energy_batch") for r in view.rows) if b is not None}
    batches |= {m.group(1) for t in texts if (m := re.search(r"at batch (\d+)", t))}
    return str(batches.pop()) if len(batches) == 1 else ""


def layer_energies(view: ReportView) -> list[tuple[str, Energy]]:
    """(layer name, energy) for the layers whose entry carries ``energy_nj``."""
    out = []
    for i, layer in enumerate(view.layers):
        energy = _energy(layer, view.doc)
        if energy is not None:
            out.append((str(layer.get("name", f"layer {i + 1}")), energy))
    return out


def _smaller(row: Row, base: Row) -> bool:
    return bool(row.file_bytes and base.file_bytes and row.file_bytes < base.file_bytes)


def _at(batch: str) -> str:
    return f" at batch {batch}" if batch else ""


# -- tables: the same rows in the HTML page and in its Markdown twin -------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]  # right-aligned columns
    names: tuple[str, ...]  # the model each row is about (for colour swatches and highlighting)
    notes: tuple[str, ...] = ()  # figures that are the same on every row (a method), said once


LABELS = {
    "accuracy": "accuracy", "cosine": "cosine", "params": "params", "nonzeros": "non-zeros", "macs": "MACs",
    "file_bytes": "file bytes", "bytes": "bytes", "compression_ratio": "ratio", "compute": "compute path",
    "directory": "directory", "recipe": "recipe", "sparsity": "sparsity", "bits": "bits",
    "structured_ratio": "structured ratio", "energy_nj": "nJ/inference (compute + memory)",
}
# Read into Row.energy (one column, its method said once); not shown again as columns of their own.
_ENERGY_KEYS = ("energy_method", "energy_compute_nj", "energy_memory_nj", "energy_low_nj", "energy_high_nj")
_PERCENT = ("sparsity", "structured_ratio")


def variant_table(view: ReportView, rows: tuple[Row, ...] | None = None) -> Table:
    """Every model (``rows``, default: all of the report's) as a row, every field present in the data as
    a column (nested ones flattened)."""
    rows = view.rows if rows is None else rows
    keys: dict[str, None] = dict.fromkeys(k for k in ("accuracy", "cosine", "objective_value")
                                          if any(k in r.data for r in rows))
    for row in rows:
        keys.update(dict.fromkeys(k for k in row.data if k not in ("name", *_ENERGY_KEYS)))
    columns: list[tuple[str, bool, Any]] = [("variant", False, lambda r: r.name)]
    notes: list[str] = []
    batches = tuple(dict.fromkeys(p.batch for r in rows for p in r.latency))
    for key in keys:
        values = [r.data.get(key) for r in rows]
        if key == "latency_ms":
            for batch in batches:
                columns.append((f"ms{_at(batch).replace(' at batch ', ' @')} median (p10–p90)", True,
                                lambda r, b=batch: _latency_cell(r.latency_at(b))))
        elif key == "objective_value":
            label = f"objective ({OBJECTIVE_UNITS.get(view.objective or '', view.objective or 'as reported')})"
            columns.append((label, True, lambda r: format_value("objective_value", r.objective_value)))
        elif key in ("energy_nj", "energy_mj"):
            energies = [r.energy for r in rows if r.energy]
            split = any(e.compute_nj is not None for e in energies)
            columns.append(("nJ/inference (compute + memory)" if split else "nJ/inference", True,
                            lambda r: _energy_cell(r.energy)))
            if any(e.low_nj is not None for e in energies):
                columns.append(("nJ bounds", True, lambda r: _bounds_cell(r.energy)))
            methods = {e.method for e in energies if e.method}
            if len(methods) <= 1:
                notes.append(f"energy: {methods.pop() if methods else 'method not recorded'}")
            else:
                columns.append(("energy method", False, lambda r: energy_label(r.energy.method if r.energy else None)))
        elif _is_method(key) and len({str(v) for v in values if v is not None}) == 1:
            notes.append(f"{key.replace('_', ' ')}: {next(v for v in values if v is not None)}")
        elif all(isinstance(v, Mapping) or v is None for v in values) and any(values):
            subkeys: dict[str, None] = {}
            for v in values:
                subkeys.update(dict.fromkeys(v or {}))
            for sub in subkeys:
                subvalues = [(v or {}).get(sub) for v in values]
                label = f"{key.replace('_', ' ')} {sub.replace('_', ' ')}"
                if _is_method(sub) and len({str(v) for v in subvalues if v is not None}) == 1:
                    notes.append(f"{label}: {next(v for v in subvalues if v is not None)}")
                else:
                    columns.append((label, _all_numbers(subvalues),
                                    lambda r, k=key, s=sub: format_value(s, (r.data.get(k) or {}).get(s))))
        else:
            label = LABELS.get(key, key.replace("_", " "))
            columns.append((label, _all_numbers(values), lambda r, k=key: format_value(k, r.data.get(k))))
    return Table(tuple(c[0] for c in columns), tuple(tuple(c[2](r) for c in columns) for r in rows),
                 tuple(c[1] for c in columns), tuple(r.name for r in rows), tuple(notes))


def split_text_columns(table: Table) -> tuple[Table, Table | None]:
    """Move the free-text columns (compute paths, directories, recipes) into a second table keyed by
    the first column, so that the figures stay on one readable row each."""
    wide = [i for i in range(1, len(table.columns)) if not table.numeric[i]]
    if not wide:
        return table, None
    keep = [i for i in range(len(table.columns)) if i not in wide]
    text = [0, *wide]

    def pick(t: Table, cols: list[int], notes: tuple[str, ...]) -> Table:
        return Table(tuple(t.columns[i] for i in cols), tuple(tuple(r[i] for i in cols) for r in t.rows),
                     tuple(t.numeric[i] for i in cols), t.names, notes)

    return pick(table, keep, table.notes), pick(table, text, ())


def latency_table(view: ReportView) -> Table:
    """p10, median and p90 per model and batch size, with the speed against the baseline."""
    rows, names = [], []
    for row in view.rows:
        for point in row.latency:
            ref = view.baseline.latency_at(point.batch) if view.baseline else None
            speed = f"{ref.median / point.median:.2f}×" if ref and ref.median and point.median else "-"
            rows.append((row.name, point.batch or "-", _ms(point.p10), _ms(point.median), _ms(point.p90),
                         f"{point.calls:,}" if point.calls else "-", speed))
            names.append(row.name)
    columns = ("variant", "batch", "p10 ms", "median ms", "p90 ms", "calls", "speed vs baseline")
    return _drop_empty(Table(columns, tuple(rows), (False, True, True, True, True, True, True), tuple(names)))


def energy_table(view: ReportView) -> Table:
    rows = [(r.name, _nj(r.energy.compute_nj), _nj(r.energy.memory_nj), _nj(r.energy.total_nj),
             _bounds_cell(r.energy), energy_label(r.energy.method)) for r in view.rows if r.energy]
    columns = ("variant", "compute nJ", "memory nJ", "total nJ", "bounds nJ", "how obtained")
    return _drop_empty(Table(columns, tuple(rows), (False, True, True, True, True, False), tuple(r[0] for r in rows)))


def _drop_empty(table: Table) -> Table:
    """Without the columns that hold nothing ("-" on every row)."""
    keep = [i for i in range(len(table.columns)) if i == 0 or any(row[i] != "-" for row in table.rows)]
    return Table(tuple(table.columns[i] for i in keep), tuple(tuple(r[i] for i in keep) for r in table.rows),
                 tuple(table.numeric[i] for i in keep), table.names, table.notes)


def layers_table(view: ReportView) -> Table:
    keys: dict[str, None] = {}
    for layer in view.layers:
        keys.update(dict.fromkeys(k for k in layer if k != "name"))
    columns = ("layer", *(LABELS.get(k, k.replace("_", " ")) for k in keys))
    rows = tuple((str(layer.get("name", f"layer {i + 1}")), *(format_value(k, layer.get(k)) for k in keys))
                 for i, layer in enumerate(view.layers))
    numeric = (False, *(_all_numbers([layer.get(k) for layer in view.layers]) for k in keys))
    return Table(columns, rows, numeric, tuple(r[0] for r in rows))


def in_points(drop: float) -> str:
    """An accuracy drop (a fraction) in percentage points: 0.01 → "1 point", 0.005 → "0.5 points"."""
    value = drop * 100
    return f"{value:.2g} point{'' if value == 1 else 's'}"


def format_value(key: str, value: Any) -> str:
    """One table cell: thousands separators, ratios as ×, shares as %, recipes as steps."""
    from nnopt.metrics.table import format_cell

    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        value = int(value)  # 7936.0 bytes reads as 7,936
    if key == "compression_ratio" and _number(value) is not None:
        return f"{value:.2f}×"
    if key in _PERCENT and _number(value) is not None:
        return f"{value:.1%}"
    if key == "energy_nj":
        energy = _energy({"energy_nj": value}, {})
        return _energy_cell(energy)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "recipe" and isinstance(value, str) and "\n" in value:
        value = _yaml(value)  # a recipe file's text: shown as its steps
    if key == "recipe" or (isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)):
        return recipe_text(value)
    if key == "shape" and isinstance(value, list):
        return "×".join(map(str, value))
    if isinstance(value, list):
        return ", ".join(format_value(key, v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(str(k), v)}" for k, v in value.items())
    return format_cell(value)


def recipe_text(recipe: Any) -> str:
    """A recipe as its steps: ``prune-magnitude(sparsity=0.5) → quantize(bits=8)``."""
    if isinstance(recipe, Mapping):
        recipe = recipe.get("steps", recipe.get("passes", [recipe]))
    if not isinstance(recipe, list):
        return str(recipe)
    steps = []
    for step in recipe:
        if not isinstance(step, Mapping):
            steps.append(str(step))
            continue
        label_key = next((k for k in ("kind", "name", "type", "method") if step.get(k)), None)
        params = ", ".join(f"{k}={_short(v)}" for k, v in step.items()
                           if k not in (label_key, "version") and v not in (None, [], {}, ()))
        steps.append(f"{step[label_key] if label_key else 'step'}({params})")
    return " → ".join(steps) or "-"


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _is_method(key: str) -> bool:
    return key == "method" or key.endswith("_method")


def _all_numbers(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(_number(v) is not None for v in present)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _nj(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value >= 1 else f"{value:.3g}"


def _latency_cell(point: LatencyPoint | None) -> str:
    if point is None or point.median is None:
        return "-"
    if point.p10 is None or point.p90 is None:
        return _ms(point.median)
    return f"{_ms(point.median)} ({_ms(point.p10)}–{_ms(point.p90)})"


def _energy_cell(energy: Energy | None) -> str:
    if energy is None:
        return "-"
    if energy.compute_nj is None or energy.memory_nj is None:
        return _nj(energy.total_nj)
    return f"{_nj(energy.total_nj)} ({_nj(energy.compute_nj)} + {_nj(energy.memory_nj)})"


def _bounds_cell(energy: Energy | None) -> str:
    if energy is None or energy.low_nj is None or energy.high_nj is None:
        return "-"
    return f"{_nj(energy.low_nj)}–{_nj(energy.high_nj)}"
