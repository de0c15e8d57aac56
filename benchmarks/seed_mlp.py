"""seed-mlp: the classic Dense 64-32-10 on digits, threshold pruning + round(w·S) quantization.

Compares nnopt's variants with the fp32 baseline and with PyTorch's own tools (torch.nn.utils.prune
with the same threshold mask, then torch.ao dynamic int8 quantization), in the same process.

    python benchmarks/seed_mlp.py [--quick] [--out benchmarks/results/seed_mlp.json]
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import torch
from _common import row, write_results  # noqa: I001  (benchmarks/ is run as a script directory)
from torch import nn

import nnopt
from nnopt.metrics import compare_latency, profile_model


def torch_peer(model: nn.Module, threshold: float) -> tuple[nn.Module, int]:
    """PyTorch's tools: the same |w| < θ mask via torch.nn.utils.prune, then dynamic int8."""
    import copy

    from torch.ao.quantization import quantize_dynamic
    from torch.nn.utils import prune as torch_prune

    peer = copy.deepcopy(model).eval()
    for module in peer.modules():
        if isinstance(module, nn.Linear):
            torch_prune.custom_from_mask(module, "weight", module.weight.abs() >= threshold)
            torch_prune.remove(module, "weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao quantized tensors are deprecated upstream
        peer = quantize_dynamic(peer, {nn.Linear}, dtype=torch.qint8)
    buffer = io.BytesIO()
    torch.save(peer.state_dict(), buffer)  # the peer's own file format; we only write it to size it
    return peer, len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and shorter timing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seed_mlp.json")
    parser.add_argument("--threshold", type=float, default=0.01)
    args = parser.parse_args()

    data = nnopt.load_digits()
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, data.train, nnopt.TrainConfig(epochs=10 if args.quick else 30))
    pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=args.threshold))
    candidates = {
        ("baseline", "fp32"): model,
        ("nnopt", "pruned"): pruned,
        ("nnopt", "int8-weights"): nnopt.quantize(model),
        ("nnopt", "pruned+int8-weights"): nnopt.quantize(pruned),
    }
    peer, peer_bytes = torch_peer(model, args.threshold)
    candidates[("torch", "pruned+int8-dynamic")] = peer

    import tempfile

    file_bytes = {("torch", "pruned+int8-dynamic"): peer_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        for key, m in candidates.items():
            if key[0] != "torch":
                file_bytes[key] = nnopt.save_model(m, Path(tmp) / f"{key[1]}").file_bytes

    batches = (1, 256)
    timings = compare_latency({f"{t}/{v}": m for (t, v), m in candidates.items()}, (64,), batches,
                              min_seconds=0.5 if args.quick else 2.0)
    rows = []
    for batch in batches:
        base_ms = timings["baseline/fp32"].at(batch).median_ms
        for (tool, variant), m in candidates.items():
            timing = timings[f"{tool}/{variant}"].at(batch)
            counts = profile_model(m, (64,)) if tool != "torch" else None
            rows.append(row(
                workload="seed-mlp", tool=tool, variant=variant, batch=batch,
                latency_ms_median=timing.median_ms, latency_ms_p10=timing.p10_ms, latency_ms_p90=timing.p90_ms,
                file_bytes=file_bytes[(tool, variant)],
                macs=counts.macs if counts else 6464, params=counts.params if counts else 6570,
                nonzeros=counts.nonzeros if counts else None,
                accuracy=nnopt.accuracy(m, data.test), speedup_vs_baseline=base_ms / timing.median_ms,
            ))
    write_results("seed-mlp", rows, args.out, {"batches": list(batches), "threshold": args.threshold})
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
