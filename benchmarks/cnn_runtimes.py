"""cnn_runtimes: where the digits CNN's time goes at batch 32, unpruned and structurally pruned, per runtime.

Why this exists: issue 5 asks for >= 2x measured CPU speed-up at batch 32 on the digits CNN (resnet8,
0.53 MMAC per image) with the speed-up >= 70% of the MAC reduction. ``benchmarks/structured.py``
measures 1.2-1.5x for 3.93x fewer MACs (ratio 0.5), for nnopt and torch-pruning alike. This
benchmark asks whether any runtime on this CPU runs the pruned network in proportion to its MACs.

Models: resnet8 (seeded, untrained: latency does not depend on the weights' values) pruned by
``nnopt.prune`` with uniform ratios 0.25, 0.5 and 0.625 (importance ``l1``, so no data is needed;
every criterion gives these same shapes), every variant with BatchNorm folded by ``nnopt.simplify``.
Batch 32 (also 1024 for torch), digits-shaped random input. Runtimes, each variant timed side by side
with its own runtime's unpruned model (``nnopt.metrics.speed.compare_calls``, alternated rounds):

- ``torch``: eager PyTorch (oneDNN convolutions). Beside it, ``kernel_us``: the time oneDNN itself
  reports for its convolution and reorder primitives per forward (``ONEDNN_VERBOSE=1`` in a child
  process, 300 forwards alternated between variants): what remains if every framework overhead
  around the kernels were gone.
- ``onnxruntime``: the exported model (``nnopt.export_onnx``) in an ONNX Runtime session with
  1 and ``--threads`` intra-op threads, graph optimizations on (its NCHWc convolution layout).
- ``openvino``: the same ONNX file compiled by OpenVINO's CPU plugin (latency hint, f32), only if
  the ``openvino`` package is installed (it is not an nnopt dependency).

    python benchmarks/cnn_runtimes.py [--quick] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import log, parse_args, run_workloads, side_by_side_rows, write_results  # noqa: I001
from torch import nn

import nnopt

RATIOS = (0.25, 0.5, 0.625)
BATCH = 32
EXTRA = ("mac_reduction", "speedup_over_mac_reduction", "kernel_us", "conv_us", "reorder_us")
_PROBE_FORWARDS = 30  # per variant and round in the oneDNN probe
_PROBE_ROUNDS = 20


def variants() -> dict[str, nn.Module]:
    """Unpruned first; every model BatchNorm-folded and in eval mode."""
    base = nnopt.create_model("resnet8", seed=0).eval()
    models = {"unpruned": base}
    for ratio in RATIOS:
        config = nnopt.StructuredPruneConfig(ratio=ratio, importance="l1", allocation="uniform", seed=0)
        models[f"ratio {ratio:g}"] = nnopt.prune(base, config)
    folded = {}
    for name, model in models.items():
        folded[name] = nnopt.simplify(model, nnopt.FoldBatchNormConfig()).eval()
    return folded


def widths(model: nn.Module) -> str:
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return "/".join(str(c) for c in convs)


def main() -> None:
    args, chosen = parse_args(__doc__, "cnn_runtimes", ("cnn",), "shorter timing; every runtime")
    if os.environ.get("NNOPT_ONEDNN_PROBE"):
        _probe()
        return
    rows, load_env = run_workloads(args, chosen, {"cnn": cnn_rows})
    env = {"threads": args.threads, "quick": args.quick, "openvino": _version("openvino"), **load_env}
    write_results("cnn_runtimes", rows, args.out, extra_env=env,
                  extra_columns=EXTRA)
    log(f"wrote {args.out}")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cnn_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = variants()
    macs = {name: nnopt.profile_model(model).macs for name, model in models.items()}
    kernels = _kernel_times(args.threads)
    seconds = 0.4 if args.quick else 1.0
    x = torch.randn(BATCH, 64, generator=torch.Generator().manual_seed(0))
    rows = []

    def finish(new: list[dict[str, Any]]) -> None:
        for r in new:
            name = r["variant"].split(" (")[0]
            r["mac_reduction"] = round(macs["unpruned"] / macs[name], 3)
            r["speedup_over_mac_reduction"] = round(r["speedup_vs_baseline"] / r["mac_reduction"], 3)
            r["macs"] = macs[name]
        rows.extend(new)

    def label(name: str) -> str:
        return f"{name} (conv widths {widths(models[name])})"

    for batch in (BATCH, 1024):
        xb = x.repeat(batch // BATCH, 1)
        calls = {("torch", label(name)): functools.partial(model, xb) for name, model in models.items()}
        extra = {("torch", label(name)): kernels.get(name, {}) if batch == BATCH else {} for name in models}
        log(f"torch eager, batch {batch}")
        finish(side_by_side_rows("cnn", calls, batch, seconds, extra, min_calls=20, rounds=20 if batch == BATCH else 5))
    with tempfile.TemporaryDirectory(prefix="nnopt-cnn-runtimes-") as tmp:
        paths = {}
        for i, (name, model) in enumerate(models.items()):
            paths[name] = Path(tmp) / f"v{i}.onnx"
            nnopt.export_onnx(model, x[:2], paths[name])
        for threads in sorted({1, args.threads}):
            log(f"onnxruntime, batch 32, {threads} thread(s)")
            runners = {name: nnopt.OnnxRunner(str(path), threads=threads) for name, path in paths.items()}
            calls = {(f"onnxruntime ({threads} thread{'s' * (threads > 1)})", label(name)): functools.partial(run, x)
                     for name, run in runners.items()}
            finish(side_by_side_rows("cnn", calls, BATCH, seconds, {}, min_calls=20, rounds=20))
        openvino = _openvino_calls(paths, x.numpy(), args.threads)
        if openvino:
            log("openvino, batch 32")
            calls = {("openvino", label(name)): call for name, call in openvino.items()}
            finish(side_by_side_rows("cnn", calls, BATCH, seconds, {}, min_calls=20, rounds=20))
    return rows


def _openvino_calls(paths: dict[str, Path], x: Any, threads: int) -> dict[str, Any]:
    try:
        import openvino
    except ImportError:
        log("openvino not installed: its rows are left out")
        return {}
    core = openvino.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    calls = {}
    for name, path in paths.items():
        request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
        calls[name] = functools.partial(request.infer, {0: x})
    return calls


# --------------------------------------------------------------------------- oneDNN's own kernel times


def _kernel_times(threads: int) -> dict[str, dict[str, float]]:
    """Per variant: oneDNN's reported convolution and reorder time per forward, in µs (the median
    over the probe's rounds, so a burst of load from elsewhere does not set it)."""
    env = {**os.environ, "NNOPT_ONEDNN_PROBE": "1", "ONEDNN_VERBOSE": "1"}
    command = [sys.executable, __file__, "--threads", str(threads)]
    log("oneDNN kernel probe (ONEDNN_VERBOSE in a child process)")
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600)
    rounds: dict[str, list[dict[str, float]]] = {}  # variant -> per round {"conv_us": .., "reorder_us": ..}
    current: dict[str, float] | None = None  # the round the lines now being read belong to
    for line in result.stdout.splitlines():
        if line.startswith("PROBE "):
            current = {"conv_us": 0.0, "reorder_us": 0.0}
            rounds.setdefault(line[len("PROBE "):], []).append(current)
            continue
        fields = line.split(",")
        if current is None or len(fields) < 6 or fields[0] != "onednn_verbose" or fields[3] != "exec":
            continue
        kind = {"convolution": "conv_us", "reorder": "reorder_us"}.get(fields[5])
        if kind is not None:
            current[kind] += float(fields[-1]) * 1000.0 / _PROBE_FORWARDS  # ms per round -> µs per forward
    out = {}
    for name, per_round in rounds.items():
        conv = statistics.median(r["conv_us"] for r in per_round)
        reorder = statistics.median(r["reorder_us"] for r in per_round)
        total = statistics.median(r["conv_us"] + r["reorder_us"] for r in per_round)
        out[name] = {"conv_us": round(conv, 1), "reorder_us": round(reorder, 1), "kernel_us": round(total, 1)}
    if not any(v["kernel_us"] for v in out.values()):
        log("oneDNN printed no kernel times (a build without oneDNN verbose?): kernel_us left out")
        return {}
    return out


def _probe() -> None:
    models = variants()
    x = torch.randn(BATCH, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for model in models.values():
            for _ in range(20):
                model(x)
        for _ in range(_PROBE_ROUNDS):
            for name, model in models.items():
                print(f"PROBE {name}", flush=True)
                for _ in range(_PROBE_FORWARDS):
                    model(x)
                sys.stdout.flush()


if __name__ == "__main__":
    main()
