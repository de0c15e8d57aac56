"""Shared output for benchmarks: the JSON document and Markdown table of BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nnopt.envinfo import environment
from nnopt.io.atomic import atomic_write_bytes
from nnopt.metrics.table import markdown_table

ROW_FIELDS = (
    "workload", "tool", "variant", "batch", "latency_ms_median", "latency_ms_p10", "latency_ms_p90",
    "file_bytes", "macs", "params", "nonzeros", "accuracy", "cosine_mean", "cosine_min",
    "speedup_vs_baseline", "energy_mj", "energy_method",
)


def row(**values: Any) -> dict[str, Any]:
    """A result row with every field present; fields that do not apply stay null."""
    unknown = set(values) - set(ROW_FIELDS)
    if unknown:
        raise KeyError(f"unknown row fields: {sorted(unknown)}")
    return {field: values.get(field) for field in ROW_FIELDS}


def write_results(
    name: str, rows: list[dict[str, Any]], out: Path, extra_env: dict[str, Any] | None = None,
    extra_columns: tuple[str, ...] = (),
) -> None:
    """Write ``out`` (JSON) and ``out`` with .md (table) atomically; ``extra_columns`` are
    benchmark-specific row fields shown in the table too."""
    doc = {"benchmark": name, "env": {**environment(), **(extra_env or {})}, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())
    columns = ["workload", "tool", "variant", "batch", "latency_ms_median", "latency_ms_p10", "latency_ms_p90",
               "speedup_vs_baseline", "accuracy", "file_bytes", "nonzeros", *extra_columns]
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)]  # drop all-null columns
    table = markdown_table(columns, [[r.get(c) for c in columns] for r in rows])
    env = doc["env"]
    timed = any(r.get("latency_ms_median") is not None for r in rows)
    header = (f"# {name}\n\n{env['device']} ({env['cpu']}), {env['threads']} threads, torch {env['torch']}. "
              + ("Latency measured side by side in one process (variants alternated). " if timed else "")
              + "Accuracy on the held-out test split; file bytes of the written file (measured).\n\n")
    atomic_write_bytes(out.with_suffix(".md"), (header + table + "\n").encode())
