"""energy: nnopt's time-aware energy per inference beside the analytic table, CodeCarbon and a hardware counter.

Issue 21: the analytic table (MACs × pJ + bytes × pJ, Horowitz 45 nm) counts only arithmetic and data
movement, so it can rank a variant that runs several times slower (int8 SimpleNet on a CPU without VNNI) as
several times cheaper. This benchmark shows, per workload × variant × batch (1 and 32), every figure side by
side and checks which of them order the variants as their measured latencies do.

Workloads (all in one process, the variants of a workload timed side by side in alternating rounds,
``nnopt.metrics.speed.compare_calls``, at ``--threads``):
- ``simplenet``: ``nnopt.create_model("simplenet", seed=0)`` trained 3 epochs on scikit-learn digits; variants
  fp32, int8-static (``StaticQuantConfig``, calibrated on the training split, as ``nnopt demo`` builds it),
  int4-weight-g32 (``WeightQuantConfig(bits=4, group_size=32)``: fewer weight bytes, slower per call) and
  structured-50 (``StructuredPruneConfig(ratio=0.5)``, 3 epochs of recovery; 1 with ``--quick``). Accuracy on
  the held-out split. Inputs: test rows.
- ``minilm``: all-MiniLM-L6-v2, fp32 and nnopt's int8-dynamic (``DynamicQuantConfig()``), batch × 128 real
  tokens (``_common.minilm_timing_inputs``).

Energy per inference (mJ), every figure labelled with its method:
- ``energy_mj`` (with ``energy_low_mj``/``energy_high_mj``): nnopt's figure, ``nnopt.energy.device_energy``:
  active power (``cpu_active_power(threads)``, estimated, the same for every variant) × the row's measured
  median time per inference; the analytic table only gives its compute/memory shares.
- ``analytic_mj``: ``nnopt.estimate_energy``'s own total (estimated: analytic table), the figure issue 21 replaces.
- ``codecarbon_mj``: the peer. CodeCarbon's ``OfflineEmissionsTracker`` (never online: no location or cloud
  look-up, nothing saved or sent) around the call repeated for a fixed window; its CPU energy (kWh → J) ÷ the
  inferences run. ``tracking_mode="process"``: this machine is shared, and "machine" mode would charge other
  processes' load to the model. ``codecarbon_method`` records its CPU mode (RAPL, TDP constant or CPU load).
  Its energy covers the tracker's whole duration (start to stop), slightly longer than the window: the same
  overhead for every variant. ``codecarbon_call_ms``: the time per call in its window (measured), to compare with
  the timed median. Null, with the reason, when codecarbon is not installed (``pip install codecarbon``).
- ``measured_mj``: ``nnopt.measure_energy`` with a RAPL (CPU) counter, idle power subtracted, the whole package
  (other load adds to it); null where no counter can be read, with the reason in ``measured_note``.
  ``error_vs_measured`` = energy_mj / measured_mj − 1 (and the same for the analytic and CodeCarbon figures).

The check (``env.orders_like_latency`` and the Markdown below the table): per (workload, batch), for each method,
whether every pair of variants whose median latencies differ by at least ``MIN_SPEEDUP`` (5%; closer pairs are
within timing noise and not compared) is ordered by energy as by latency.

    python benchmarks/energy.py [--quick] [--threads 2] [--train-threads 1] [--only simplenet,minilm] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import itertools
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from _common import (  # noqa: I001  (benchmarks/ is run as a script directory)
    TRAIN_THREADS_OPTION,
    log,
    minilm_timing_inputs,
    parse_args,
    run_workloads,
    side_by_side_rows,
    significant,
    threads,
    write_results,
)
from torch import nn

import nnopt
from nnopt.energy import ActivePower, cpu_active_power, device_energy, estimate_energy, measure_energy
from nnopt.metrics.speed import MIN_SPEEDUP

WORKLOADS = ("simplenet", "minilm")
BATCHES = (1, 32)
METHODS = {"nnopt": "energy_mj", "analytic": "analytic_mj", "codecarbon": "codecarbon_mj", "measured": "measured_mj"}
EXTRA = ("energy_low_mj", "energy_high_mj", "analytic_mj", "codecarbon_mj", "codecarbon_call_ms", "measured_mj",
         "error_vs_measured",
         "analytic_error_vs_measured", "codecarbon_error_vs_measured")

Key = tuple[str, str]


def main() -> None:
    quick = "shorter timing, shorter CodeCarbon windows, 1 recovery epoch; still every method"
    args, chosen = parse_args(__doc__ or "", "energy", WORKLOADS, quick, extra=(TRAIN_THREADS_OPTION,))
    rows, load_env = run_workloads(args, chosen, RUNNERS)
    checks = orders_like_latency(rows)
    power = cpu_active_power(args.threads)
    write_results("energy", rows, args.out, extra_columns=EXTRA, extra_env={
        "codecarbon": _codecarbon_version(), "active_power": power.to_dict(), "orders_like_latency": checks,
        "min_speedup_compared": MIN_SPEEDUP, "train_threads": args.train_threads, "quick": args.quick, **load_env,
    })
    append_check(args.out.with_suffix(".md"), rows, checks)
    append_recorded_gpu(args.out.with_suffix(".md"), Path(__file__).parent / "results" / "gpu.json")
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


# --------------------------------------------------------------------------- workloads


def simplenet_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from nnopt.metrics.accuracy import accuracy

    data = nnopt.load_digits()
    with threads(args.train_threads):
        model = nnopt.create_model("simplenet", seed=0)
        nnopt.train(model, data.train, nnopt.TrainConfig(epochs=3, seed=0), progress=False)
        recovery = 1 if args.quick else 3
        variants: dict[Key, nn.Module] = {
            ("baseline", "fp32"): model.eval(),
            ("nnopt", "int8-static"): nnopt.quantize(model, nnopt.StaticQuantConfig(), data=data.train),
            # weight-only int4: fewer bytes moved (the analytic table's memory term falls) but dequantized or
            # run by a bf16 kernel per call, so on many CPUs slower: where the analytic table can invert
            ("nnopt", "int4-weight-g32"): nnopt.quantize(model, nnopt.WeightQuantConfig(bits=4, group_size=32)),
            ("nnopt", "structured-50"): nnopt.prune(
                model, nnopt.StructuredPruneConfig(ratio=0.5, finetune_epochs=recovery, seed=0), data=data.train),
        }
    extra = {key: {"accuracy": round(accuracy(m.eval(), data.test), 4)} for key, m in variants.items()}
    log("simplenet variants: " + ", ".join(f"{k[1]} accuracy {v['accuracy']}" for k, v in extra.items()))
    seconds = 0.3 if args.quick else 1.0
    rows = []
    for batch in BATCHES:
        x = data.test.x[:batch]
        calls = {key: functools.partial(m, x) for key, m in variants.items()}
        rows += energy_rows("simplenet", variants, calls, batch, args, extra, seconds, min_calls=20, rounds=10)
    return rows


def minilm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = nnopt.create_model("minilm").eval()
    variants: dict[Key, nn.Module] = {
        ("baseline", "fp32"): model,
        ("nnopt", "int8-dynamic"): nnopt.quantize(model, nnopt.DynamicQuantConfig()).eval(),
    }
    rows = []
    for batch in BATCHES:
        inputs = minilm_timing_inputs(batch)
        calls = {key: functools.partial(m, **inputs) for key, m in variants.items()}
        seconds = (0.5 if batch == 1 else 1.0) if args.quick else (1.5 if batch == 1 else 3.0)
        min_calls = 20 if batch == 1 else (5 if args.quick else 10)
        rows += energy_rows("minilm", variants, calls, batch, args, {}, seconds, min_calls, rounds=min(min_calls, 10))
    return rows


def energy_rows(
    workload: str, variants: dict[Key, nn.Module], calls: Mapping[Key, Callable[[], object]], batch: int,
    args: argparse.Namespace, extra: dict[Key, dict[str, Any]], seconds: float, min_calls: int, rounds: int,
) -> list[dict[str, Any]]:
    """Time the variants side by side, then add every energy figure to each row."""
    log(f"{workload} timing batch {batch}: {len(calls)} variants")
    rows = side_by_side_rows(workload, dict(calls), batch, seconds, extra, min_calls, rounds)
    power = cpu_active_power(args.threads)
    window = 1.5 if args.quick else 3.0
    for r in rows:
        key = (r["tool"], r["variant"])
        r.update(energy_figures(variants[key], calls[key], r["latency_ms_median"], batch, power, window))
        log(f"{workload} batch {batch} {key[1]:14s} {r['latency_ms_median']:9.4f} ms  nnopt {r['energy_mj']:.4g} mJ  "
            f"analytic {r['analytic_mj']:.4g} mJ  codecarbon {r['codecarbon_mj']} mJ  measured {r['measured_mj']} mJ")
    return rows


# --------------------------------------------------------------------------- energy figures


def energy_figures(model: nn.Module, call: Callable[[], object], latency_ms: float, batch: int,
                   power: ActivePower, window_s: float) -> dict[str, Any]:
    """Every figure for one row, per inference (mJ): nnopt's, the analytic table's, CodeCarbon's, a counter's."""
    estimate = estimate_energy(model, batch=batch)
    device = device_energy(latency_ms / 1e3, batch, power, estimate)
    with torch.inference_mode():
        peer = codecarbon_energy(call, batch, window_s)
        measured, measured_note = counter_energy(call, batch)
    figures = {
        "energy_mj": significant(device.joules * 1e3), "energy_method": device.method,
        "energy_low_mj": significant(device.low_j * 1e3), "energy_high_mj": significant(device.high_j * 1e3),
        "analytic_mj": significant(estimate.total_mj), "analytic_method": estimate.method,
        **peer,
        "measured_mj": measured, "measured_note": measured_note,
    }
    for prefix, field in (("", "energy_mj"), ("analytic_", "analytic_mj"), ("codecarbon_", "codecarbon_mj")):
        value = figures[field]
        error = None if not measured or value is None else significant(value / measured - 1)
        figures[f"{prefix}error_vs_measured"] = error
    return figures


def codecarbon_energy(call: Callable[[], object], batch: int, window_s: float) -> dict[str, Any]:
    """CodeCarbon's CPU energy per inference (mJ) for ``call`` repeated for ``window_s``, how it got it, and the
    time per call in its window (ms, measured: a slower window than the timed one raises its figure)."""
    fields: dict[str, Any] = {"codecarbon_mj": None, "codecarbon_call_ms": None}
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError as exc:
        return {**fields, "codecarbon_method": f"not run: codecarbon is not installed ({exc}); pip install codecarbon"}
    # Offline: the country is given, so no geolocation or cloud-metadata request; nothing is saved or sent.
    # measure_power_secs = the window: its sampling thread wakes only at stop, not amid the calls it measures
    # (sampling every 0.25 s slowed SimpleNet's calls here).
    tracker = OfflineEmissionsTracker(
        country_iso_code="USA", save_to_file=False, save_to_api=False, save_to_logger=False, log_level="error",
        measure_power_secs=window_s, tracking_mode="process",
    )
    tracker.start()
    started, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - started < window_s:
        call()
        calls += 1
    loop_s = time.perf_counter() - started
    tracker.stop()
    # None when the tracker failed: codecarbon logs its own errors and suppresses them
    data: Any = getattr(tracker, "final_emissions_data", None)
    if data is None or data.cpu_energy is None:
        return {**fields, "codecarbon_method": "codecarbon returned no emissions data"}
    cpu = next((h for h in getattr(tracker, "_hardware", []) if type(h).__name__ == "CPU"), None)
    mode = getattr(cpu, "_mode", "unknown mode")
    tdp = getattr(cpu, "_tdp", None)
    method = (f"estimated by CodeCarbon {_codecarbon_version()}: CPU mode {mode!r}"
              + (f" (TDP {tdp} W for CPU {data.cpu_model!r})" if tdp is not None else "")
              + f", tracking_mode {data.tracking_mode!r}, mean CPU power {data.cpu_power:.3g} W over its "
              f"{data.duration:.2f} s (calls for {loop_s:.2f} s: {calls} calls × batch {batch}); "
              "CPU energy kWh × 3.6e6 J ÷ inferences")
    return {"codecarbon_mj": significant(data.cpu_energy * 3.6e9 / (calls * batch)),
            "codecarbon_call_ms": significant(loop_s * 1e3 / calls), "codecarbon_method": method}


def counter_energy(call: Callable[[], object], batch: int) -> tuple[float | None, str]:
    """Energy per inference (mJ) measured with a RAPL counter, or None and why there is none."""
    from nnopt.energy.counters import available_counters, describe_unavailable

    counters = available_counters("cpu")
    if not counters:
        return None, describe_unavailable("cpu")
    measurement = measure_energy(call, counters[0], runs=5, window_s=max(0.05, 20 * counters[0].update_period_s))
    if measurement.median_j is None:
        return None, measurement.summary()
    note = measurement.summary() + "; whole package: other load adds to it"
    return significant(measurement.median_j * 1e3 / batch), note


def _codecarbon_version() -> str | None:
    try:
        return importlib.metadata.version("codecarbon")
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- the ordering check


def orders_like_latency(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (workload, batch): does each method order the variants as their measured latencies do?

    Pairs whose latencies differ by less than MIN_SPEEDUP are not compared (timing noise); a method with a null
    figure for any compared variant gets null."""
    checks: dict[str, dict[str, Any]] = {}
    for (workload, batch), same in itertools.groupby(rows, key=lambda r: (r["workload"], r["batch"])):
        group = sorted(same, key=lambda r: r["latency_ms_median"])
        pairs = [(a, b) for a, b in itertools.combinations(group, 2)
                 if b["latency_ms_median"] >= MIN_SPEEDUP * a["latency_ms_median"]]  # a is faster than b
        result: dict[str, Any] = {"latency_order": [r["variant"] for r in group], "pairs_compared": len(pairs)}
        agrees: dict[str, bool | None] = {}
        disagreements: dict[str, list[str]] = {}
        for method, field in METHODS.items():
            if any(r[field] is None for r in group):
                agrees[method] = None
                continue
            wrong = [f"{b['variant']} ({b[field]:.4g} mJ) <= {a['variant']} ({a[field]:.4g} mJ)"
                     for a, b in pairs if not b[field] > a[field]]
            agrees[method] = not wrong
            if wrong:
                disagreements[method] = wrong
        checks[f"{workload} batch {batch}"] = {"orders_like_latency": agrees, **result,
                                               "disagreements": disagreements}
    return checks


def append_check(markdown: Path, rows: list[dict[str, Any]], checks: dict[str, dict[str, Any]]) -> None:
    """Add the ordering check and each column's method below the table ``write_results`` rendered."""
    from nnopt.io.atomic import atomic_write_bytes
    from nnopt.metrics.table import markdown_table

    table = markdown_table(
        ["workload, batch", "latency order (fastest first)", "pairs compared", *METHODS],
        [[name, " < ".join(c["latency_order"]), c["pairs_compared"], *c["orders_like_latency"].values()]
         for name, c in checks.items()],
    )
    wrong = [f"- {name}, {method}: {'; '.join(items)}" for name, c in checks.items()
             for method, items in c["disagreements"].items()]
    first = rows[0] if rows else {}
    notes = [
        f"- `energy_mj` (nnopt), per inference: {first.get('energy_method', '')}",
        f"- `analytic_mj`: {first.get('analytic_method', '')} (its own total: what issue 21 replaces)",
        f"- `codecarbon_mj`: {first.get('codecarbon_method', '')}",
        f"- `measured_mj`: {first.get('measured_note', '')}",
        "- `error_vs_measured` columns: figure / measured − 1 (null without a counter).",
    ]
    text = ("\n## Does each method order the variants as their measured latencies do?\n\n"
            f"Every pair of variants whose median latencies differ by at least {MIN_SPEEDUP:g}× is compared "
            "(closer pairs are within timing noise); '-': the method gave no figure here. nnopt's column holds by "
            "construction (one power × the same measured times): it is a consistency check, not a validation, "
            "which needs a counter (`measured`).\n\n"
            + table + "\n\n" + ("\n".join(wrong) + "\n\n" if wrong else "")
            + "Methods (first row; every row's own is in the JSON):\n\n" + "\n".join(notes) + "\n")
    atomic_write_bytes(markdown, (markdown.read_text() + text).encode())


GPU_BOARD_POWER = {"H200": 700.0, "H100": 700.0, "A100": 400.0}  # published board power (SXM parts), W


def recorded_gpu_power(gpu_json: Path) -> tuple[str, list[list[Any]], dict[str, Any]] | None:
    """What one power × time could do on a GPU, from NVML measurements recorded by ``benchmarks/gpu.py``.

    For each recorded row with a measured energy, the power above idle it implies (energy ÷ time per sample);
    then the error of the best single power (the median of those) × each row's time. Returns (device, table
    rows, summary), or None where no recorded measurement exists.
    """
    import json
    import statistics

    if not gpu_json.is_file():
        return None
    doc = json.loads(gpu_json.read_text())
    measured = [r for r in doc.get("rows", []) if r.get("energy_mj") and r.get("latency_ms_median")]
    if not measured:
        return None
    watts = [r["energy_mj"] * r["batch"] / r["latency_ms_median"] for r in measured]  # mJ·sample/ms = W
    best = statistics.median(watts)  # fitted to the measurements themselves: the best any one power could do
    device = str(doc.get("env", {}).get("gpu") or doc.get("env", {}).get("device"))
    board = next((w for name, w in GPU_BOARD_POWER.items() if name in device), None)
    table, errors, prior_errors = [], [], []
    for r, w in zip(measured, watts):
        per_sample_s = r["latency_ms_median"] / r["batch"]
        estimate_mj = best * per_sample_s
        errors.append(estimate_mj / r["energy_mj"] - 1)
        prior = None if board is None else board * 0.75 * per_sample_s  # a priori: board power × 0.5–1, the middle
        if prior is not None:
            prior_errors.append(prior / r["energy_mj"] - 1)
        table.append([r["workload"], r["variant"], r["batch"], r["latency_ms_median"], r["energy_mj"], round(w, 1),
                      significant(estimate_mj), f"{errors[-1]:+.0%}", "-" if prior is None else significant(prior),
                      "-" if prior is None else f"{prior_errors[-1]:+.0%}"])
    within = sum(abs(e) <= 0.3 for e in errors)
    return device, table, {"best_single_w": best, "min_w": min(watts), "max_w": max(watts), "board_w": board,
                           "within_30_percent": within, "rows": len(errors),
                           "prior_within_30_percent": sum(abs(e) <= 0.3 for e in prior_errors)}


def append_recorded_gpu(markdown: Path, gpu_json: Path) -> None:
    """The GPU side of the validation, from recorded NVML measurements (no GPU on the measuring machine)."""
    from nnopt.io.atomic import atomic_write_bytes
    from nnopt.metrics.table import markdown_table

    found = recorded_gpu_power(gpu_json)
    if found is None:
        return
    device, table, summary = found
    text = (f"\n## On a GPU: does one power × the measured time fit? ({device}, NVML, recorded)\n\n"
            f"From `{gpu_json.name}` (measured by `benchmarks/gpu.py` on a lent {device}, NVML total energy, idle "
            "subtracted; not re-measured in this run). The power above idle each measurement implies ranges "
            f"{summary['min_w']:.0f}–{summary['max_w']:.0f} W across variants; even the best single power (the median, "
            f"{summary['best_single_w']:.0f} W) × each variant's time lands within ±30% of the measurement for "
            f"{summary['within_30_percent']} of {summary['rows']} rows. On this GPU a slower variant can use less "
            "energy (MiniLM int8: 3.6× fp32's time, 0.46× its energy), so nnopt's power × time estimate is for CPUs; "
            "on a GPU it reports NVML measurements (`measure_energy(device=\"cuda\")`), and the energy-aware "
            "allocation refuses a model on a GPU.\n\n"
            + (f"A priori, the board's published power ({summary['board_w']:g} W) × 0.5–1.0 (the middle) × the time "
               f"is within ±30% for {summary['prior_within_30_percent']} of {summary['rows']} rows.\n\n"
               if summary["board_w"] else "")
            + markdown_table(["workload", "variant", "batch", "ms per call", "measured mJ/sample", "implied W",
                              "best single W (fitted) × time, mJ", "error", "board W × 0.75 × time, mJ",
                              "error (a priori)"], table) + "\n")
    atomic_write_bytes(markdown, (markdown.read_text() + text).encode())


RUNNERS = {"simplenet": simplenet_rows, "minilm": minilm_rows}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
