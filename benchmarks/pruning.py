"""pruning: LeNet-300-100 on digits at 50-98% sparsity, nnopt vs torch.nn.utils.prune, same run.

nnopt: gradual global magnitude pruning (cubic schedule) with E epochs of fine-tuning, saved in
the packed format, then with 4-bit weight codes. torch.nn.utils.prune: global L1 pruning in one
shot, then the same E epochs of fine-tuning through its masks, saved with torch.save (its own
format stores the zeros densely). Accuracy on the held-out test split; bytes of files written.
Then one 4096×4096 Linear at 50/90/95/99% sparsity: the kernel nnopt picks vs dense, at batch 1
and 64 (see benchmarks/sparse_linear.py).

    python benchmarks/pruning.py [--quick] [--out benchmarks/results/pruning.json]
"""

from __future__ import annotations

import argparse
import copy
import io
import tempfile
from pathlib import Path

import torch
from _common import row, write_results  # noqa: I001  (benchmarks/ is run as a script directory)
from torch import nn

import nnopt
from nnopt.metrics import profile_model

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


def torch_peer(model: nn.Module, sparsity: float, data, epochs: int) -> tuple[nn.Module, int]:
    """Global L1 pruning with torch.nn.utils.prune, fine-tuned through its masks."""
    from torch.nn.utils import prune as torch_prune

    peer = copy.deepcopy(model)
    params = [(peer.features[0], "weight"), (peer.features[2], "weight")]  # the classifier is left alone
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    nnopt.train(peer, data, nnopt.TrainConfig(epochs=epochs), progress=False)
    for module, name in params:
        torch_prune.remove(module, name)
    buffer = io.BytesIO()
    torch.save(peer.state_dict(), buffer)  # written only to measure its size
    return peer, len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (still every tool and sparsity)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pruning.json")
    args = parser.parse_args()
    epochs = 12 if args.quick else 30

    data = nnopt.load_digits()
    dense = nnopt.create_model("lenet300", seed=0)
    nnopt.train(dense, data.train, nnopt.TrainConfig(epochs=30), progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = nnopt.save_model(dense, Path(tmp) / "dense")
        counts = profile_model(dense)
        rows.append(row(workload="lenet300", tool="baseline", variant="fp32 dense", file_bytes=base.file_bytes,
                        params=counts.params, nonzeros=counts.nonzeros, macs=counts.macs,
                        accuracy=nnopt.accuracy(dense, data.test)))
        for sparsity in SPARSITIES:
            config = nnopt.GradualPruneConfig(final_sparsity=sparsity, epochs=epochs, allocation="global")
            pruned = nnopt.prune(dense, config, data=data.train, progress=False)
            coded = nnopt.quantize(pruned, nnopt.WeightQuantConfig(bits=4))
            peer, peer_bytes = torch_peer(dense, sparsity, data.train, epochs)
            candidates = {
                ("nnopt", f"gradual {sparsity:.0%}, fp32, packed"): (pruned, None),
                ("nnopt", f"gradual {sparsity:.0%}, int4, packed"): (coded, None),
                ("torch-prune", f"global L1 {sparsity:.0%}, fp32, torch.save"): (peer, peer_bytes),
            }
            for (tool, variant), (model, size) in candidates.items():
                if size is None:
                    size = nnopt.save_model(model, Path(tmp) / "m", overwrite=True, weights_format="packed").file_bytes
                counts = profile_model(model, (64,))
                rows.append(row(workload="lenet300", tool=tool, variant=variant, file_bytes=size,
                                params=counts.params, nonzeros=counts.nonzeros, macs=counts.macs,
                                accuracy=nnopt.accuracy(model, data.test)))
                rows[-1]["compression_ratio"] = base.meta["dense_fp32_bytes"] / size
                print(f"{tool:12} {variant:36} acc {rows[-1]['accuracy']:.4f} bytes {size:8,} "
                      f"ratio {rows[-1]['compression_ratio']:.1f}x", flush=True)
    from sparse_linear import linear_rows

    kernel_rows, kernel_env = linear_rows(args.quick)
    write_results("pruning", rows + kernel_rows, args.out,
                  {"fine_tune_epochs": epochs, "dense_train_epochs": 30, "linear4096": kernel_env},
                  extra_columns=("compression_ratio",))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
