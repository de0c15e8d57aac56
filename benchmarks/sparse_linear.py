"""sparse-linear: one 4096×4096 Linear, magnitude-pruned, dense fp32 vs the kernel nnopt picks.

For each sparsity (0.5, 0.9, 0.95, 0.99 of the weights zeroed: the smallest |w| of a random normal
matrix) and batch size (1, 64), ``nnopt.sparse.kernels.choose_kernels`` measures dense vs CSR and
picks one; then the dense baseline and nnopt's pick are timed again side by side (alternated, same
process, same input). When nnopt keeps the dense kernel, the rejected CSR layer is timed too and
shown as tool "nnopt-rejected", so the table says what was turned down and why.

MACs are per sample and counted for a dense kernel (4096·4096, zeros included); ``nonzeros`` counts
the non-zero weights and biases, which is what a sparse kernel touches.

    python benchmarks/sparse_linear.py [--quick] [--threads N] [--out benchmarks/results/sparse_linear.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import row, write_results  # noqa: I001  (benchmarks/ is run as a script directory)
from torch import nn

from nnopt.metrics import compare_latency
from nnopt.sparse import SparseKernelConfig, SparseLinear
from nnopt.sparse.kernels import choose_kernels

FEATURES = 4096
SPARSITIES = (0.5, 0.9, 0.95, 0.99)
BATCHES = (1, 64)


def pruned_linear(sparsity: float, seed: int = 0) -> nn.Linear:
    """A random 4096×4096 Linear with the ``sparsity`` fraction of smallest-|w| weights set to 0."""
    torch.manual_seed(seed)
    layer = nn.Linear(FEATURES, FEATURES)
    with torch.no_grad():
        layer.weight.normal_()
        magnitude = layer.weight.abs().view(-1)
        cut = magnitude.kthvalue(int(round(sparsity * magnitude.numel()))).values
        layer.weight.mul_(layer.weight.abs() > cut)
    return layer.eval()


def linear_rows(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Benchmark rows and the recorded kernel choices (shared with benchmarks/pruning.py)."""
    seconds = 0.4 if quick else 2.0  # per candidate, for the choice and again for the table
    started = time.perf_counter()
    rows, choices = [], {}
    for sparsity in SPARSITIES:
        dense = pruned_linear(sparsity)
        weight_nnz = int(torch.count_nonzero(dense.weight))
        nonzeros = weight_nnz + int(torch.count_nonzero(dense.bias))
        params = dense.weight.numel() + dense.bias.numel()
        workload = f"linear-4096x4096-s{sparsity}"
        for batch in BATCHES:
            holder = nn.Sequential(dense)  # choose_kernels swaps the layer inside holder; dense stays as is
            details = choose_kernels(holder, SparseKernelConfig(batch_size=batch, min_seconds=seconds))
            choice = details["layers"]["0"]
            picked = holder[0]
            kernel = choice["kernel"]
            choices[f"{workload}/batch{batch}"] = {**choice, "threads": details["threads"]}
            candidates = {"baseline": dense, "nnopt": picked}
            if kernel == "dense":
                candidates["nnopt-rejected"] = SparseLinear.from_linear(dense)
            timings = compare_latency(candidates, (FEATURES,), (batch,), min_seconds=seconds)
            base_ms = timings["baseline"].at(batch).median_ms
            variants = {"baseline": "dense-fp32", "nnopt": kernel, "nnopt-rejected": "csr"}
            for tool in candidates:
                timing = timings[tool].at(batch)
                rows.append(row(
                    workload=workload, tool=tool, variant=variants[tool], batch=batch,
                    latency_ms_median=timing.median_ms, latency_ms_p10=timing.p10_ms, latency_ms_p90=timing.p90_ms,
                    macs=FEATURES * FEATURES, params=params, nonzeros=nonzeros,
                    speedup_vs_baseline=base_ms / timing.median_ms,
                ))
            print(f"{workload} batch {batch}: picked {kernel} (choice: dense {choice['dense_ms']:.3f} ms, "
                  f"csr {choice['sparse_ms']:.3f} ms); table: baseline {base_ms:.3f} ms, "
                  f"nnopt {timings['nnopt'].at(batch).median_ms:.3f} ms", flush=True)
    extra = {
        "batches": list(BATCHES), "sparsities": list(SPARSITIES), "threads_used": torch.get_num_threads(),
        "min_seconds_per_candidate": seconds, "quick": quick,
        "macs_method": "per sample, analytic count for a dense kernel (4096*4096, zeros included)",
        "latency_method": "median of alternated timed calls (nnopt.metrics.compare_latency), baseline and "
                          "nnopt's pick in the same process on the same random input",
        "choices": choices, "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return rows, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing (about a minute on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_linear.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before timing (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows, extra = linear_rows(args.quick)
    write_results("sparse-linear", rows, args.out, extra)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
