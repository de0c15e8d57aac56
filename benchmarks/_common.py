"""Shared output for benchmarks: the JSON document and Markdown table of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
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
    atomic_write_bytes(out.with_suffix(".md"), render_markdown(doc, extra_columns).encode())


def render_markdown(doc: dict[str, Any], extra_columns: tuple[str, ...] = ()) -> str:
    """The Markdown table of a benchmark document, headed by where it ran (CPU, ISA class, threads)."""
    rows, env = doc["rows"], doc["env"]
    columns = ["workload", "tool", "variant", "batch", "latency_ms_median", "latency_ms_p10", "latency_ms_p90",
               "speedup_vs_baseline", "accuracy", "file_bytes", "nonzeros", *extra_columns, "energy_mj"]
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)]  # drop all-null columns
    table = markdown_table(columns, [[r.get(c) for c in columns] for r in rows])
    timed = any(r.get("latency_ms_median") is not None for r in rows)
    isa = env.get("isa", "ISA class not recorded")
    if env.get("onednn_max_cpu_isa"):
        isa += f", oneDNN capped with ONEDNN_MAX_CPU_ISA={env['onednn_max_cpu_isa']}"
    threads = f"{env['threads']} thread{'' if env['threads'] == 1 else 's'}"
    header = (f"# {doc['benchmark']}\n\n{env['device']} ({env['cpu']}; {isa}), {threads}, "
              f"torch {env['torch']}. "
              + ("Latency measured side by side in one process (variants alternated). " if timed else "")
              + ("Accuracy on the held-out test split. " if any(r.get("accuracy") is not None for r in rows) else "")
              + ("File bytes of the written file (measured)." if any(r.get("file_bytes") is not None for r in rows)
                 else "")
              + (" Energy (`energy_mj`) per inference; how each figure was obtained is its row's `energy_method` "
                 "in the JSON." if any(r.get("energy_mj") is not None for r in rows) else "") + "\n\n")
    return header + table + "\n"


def parse_args(
    doc: str, name: str, workloads: Sequence[str], quick_help: str, extra: Sequence[tuple[tuple[str, ...], dict]] = (),
) -> tuple[argparse.Namespace, list[str]]:
    """The options every benchmark shares (--quick, --threads, --only, --out, plus ``extra``), applied:
    torch threads set, nnopt's allocator tuning on (the same for every variant; recorded in env)."""
    import torch

    import nnopt

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=2, help="threads for timing")
    for flags, options in extra:
        parser.add_argument(*flags, **options)
    parser.add_argument("--only", default=",".join(workloads), help="comma-separated workloads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{name}.json")
    args = parser.parse_args()
    chosen = [w for w in args.only.split(",") if w]
    unknown = set(chosen) - set(workloads)
    if unknown:
        raise SystemExit(f"unknown workloads: {sorted(unknown)}; known: {', '.join(workloads)}")
    torch.set_num_threads(args.threads)
    nnopt.tune_allocator()
    warnings.filterwarnings("ignore")
    return args, chosen


def minilm_timing_inputs(batch: int) -> dict[str, Any]:
    """``batch`` sequences of exactly 128 real tokens (no padding): windows of the bundled corpus."""
    from nnopt.models.hf_encoder import encode_batch
    from nnopt.text import load_sentences

    words = " ".join(load_sentences()).split()
    step = len(words) // 32  # 32 windows of running text, each long enough to fill 128 tokens
    sequences = [" ".join((words * 2)[i * step : i * step + 200]) for i in range(32)]
    inputs = dict(encode_batch(sequences[:batch], max_length=128, pad_to_max_length=True))
    assert int(inputs["attention_mask"].sum()) == 128 * batch, "every timed sequence is 128 real tokens"
    return inputs


def side_by_side_rows(
    workload: str, calls: dict[tuple[str, str], Any], batch: int, seconds: float,
    extra: dict[tuple[str, str], dict[str, Any]], min_calls: int, rounds: int = 5, digits: int = 4,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Time every ``(tool, variant)`` call side by side at one batch size; the first is the baseline.

    ``seconds`` and ``min_calls`` are per variant, spread over ``rounds`` alternations, so that a
    burst of load from elsewhere falls on every variant alike. ``extra`` holds each variant's other
    fields: standard row fields go into the row, others are appended after them; an :func:`energy_fields`
    estimate becomes the row's energy per inference from its measured time (:func:`timed_energy`).
    """
    import torch

    from nnopt.metrics.speed import compare_calls

    with torch.inference_mode():
        timings = compare_calls(calls, batch, warmup=3, min_calls=min_calls, min_seconds=seconds, rounds=rounds,
                                device=device)
    base = timings[next(iter(calls))].median_ms
    out = []
    for (tool, variant), timing in timings.items():
        info = dict(extra.get((tool, variant), {}))
        estimates = info.pop("energy_estimates", None)
        if estimates is not None and batch in estimates:
            if device != "cpu":
                raise ValueError(f"energy_fields prices CPU time; timed on {device}, pass the energy measured there")
            info.update(timed_energy(estimates[batch], timing.median_ms / 1e3, batch))
        r = row(workload=workload, tool=tool, variant=variant, batch=batch,
                latency_ms_median=round(timing.median_ms, digits), latency_ms_p10=round(timing.p10_ms, digits),
                latency_ms_p90=round(timing.p90_ms, digits), speedup_vs_baseline=round(base / timing.median_ms, 3),
                **{k: v for k, v in info.items() if k in ROW_FIELDS})
        r.update({k: v for k, v in info.items() if k not in ROW_FIELDS})
        out.append(r)
    return out


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block at ``n`` torch threads, then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_average_env(start: tuple[float, float, float]) -> dict[str, Any]:
    """The machine's load average at the start and end of a run, for the results' env."""
    import os

    return {"loadavg_1_5_15_min": {"start": [round(v, 2) for v in start],
                                   "end": [round(v, 2) for v in os.getloadavg()]}}


TRAIN_THREADS_OPTION = (("--train-threads",), {"type": int, "default": 1, "help": "threads for training small models"})
_STARTED = __import__("time").perf_counter()


def log(message: str) -> None:
    """A progress line with the seconds since the benchmark started."""
    import time

    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", flush=True)


def run_workloads(
    args: argparse.Namespace, chosen: Sequence[str], runners: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run each chosen workload's ``runner(args)``; returns the rows and the load-average env, with
    torch back at the timing thread count (which env records)."""
    import os

    import torch

    start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for workload in chosen:
        log(workload)
        rows += runners[workload](args)
    torch.set_num_threads(args.threads)
    return rows, load_average_env(start)


def energy_fields(model: Any, batches: Sequence[int]) -> dict[str, Any]:
    """The analytic estimate at each timed batch size: :func:`side_by_side_rows` turns it into each row's
    ``energy_mj`` (active power × that row's measured time) once the row is timed."""
    from nnopt.energy import estimate_energy

    return {"energy_estimates": {b: estimate_energy(model, batch=b) for b in batches}}


def timed_energy(estimate: Any, latency_s_per_call: float, batch: int) -> dict[str, Any]:
    """A row's energy per inference (mJ): the CPU's active power at the timing threads × its measured time, so
    a slower variant never shows as cheaper. The analytic table's own total (arithmetic and data movement only,
    which can rank a slower kernel as cheaper) is kept as ``analytic_mj``, never as the row's energy."""
    import torch

    from nnopt.energy import cpu_active_power, device_energy

    energy = device_energy(latency_s_per_call, batch, cpu_active_power(torch.get_num_threads()), estimate)
    return {"energy_mj": significant(energy.joules * 1e3), "energy_method": energy.method,
            "analytic_mj": significant(estimate.total_mj),
            "analytic_method": f"{estimate.method}; arithmetic and data movement only, not the inference's energy"}


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant figures (readable at any scale)."""
    return float(f"{value:.{digits}g}")
