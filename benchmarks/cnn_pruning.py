"""cnn_pruning: structured pruning of ImageNet CNNs at 224×224, nnopt beside torch-pruning, at the same MACs.

Issue 19 asks that a ResNet-50-shaped network at 2× fewer MACs and MobileNetV2 at 1.5× fewer MACs run
≥ 70% of their MAC reduction as measured batch-32 speed-up in the faster runtime, and that
MobileNetV2's agreement with the unpruned model after label-free recovery be reported beside
torch-pruning's at the same MACs and recovery.

Models: ``resnet50`` (random init, seed 0: latency does not depend on the weights' values; no recovery,
its outputs mean nothing) and ``mobilenet_v2`` with torchvision's ImageNet weights
(``nnopt.models.imagenet_cnns.pretrained_mobilenet_v2``). Images: ``nnopt.photos.photo_splits``
(fitting crops for gradients and recovery; held-out crops from other photographs for agreement).

Variants, each at the requested MACs reduction (MACs per sample from ``nnopt.profile_model``):
- ``nnopt``: ``nnopt.prune(model, StructuredPruneConfig(target_mac_reduction=X, channel_multiple="auto",
  importance="gradient", finetune_epochs=E, distill=1.0), data=fit_crops)``: the ratio solved for X,
  kept channel counts rounded to the multiple that a timed convolution says runs fastest per MAC on
  this CPU, gradients of the model's confidence in its own top-1 (no labels), then label-free
  distillation from the unpruned model (``recovery_steps`` Adam steps at batch ``RECOVERY_BATCH``).
- ``torch-pruning``: ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance`` (its default, L2),
  the classifier ignored, ``round_to`` = the multiple nnopt chose, its ``pruning_ratio`` solved by
  bisection for the same MACs reduction; then the same recovery (``nnopt.train`` with the unpruned
  model as teacher, the same crops, steps, batch, lr and seed).

Timing (``nnopt.metrics.speed.compare_calls``: unpruned and pruned variants alternated in rounds, one
process): torch eager with BatchNorm folded (``nnopt.simplify``) in every variant, and ONNX Runtime
(``nnopt.export_onnx`` + ``nnopt.OnnxRunner``, graph optimizations on, ``--threads`` threads), at
batch 1 and 32 of random 224×224 inputs. ``speedup_over_mac_reduction`` = measured speed-up ÷ MACs
reduction (the goal: ≥ 0.70 in the faster runtime). ``agreement``: top-1 agreement with the unpruned
model on the held-out crops (MobileNetV2; the random ResNet's is left out).

    python benchmarks/cnn_pruning.py [--quick] [--threads 2] [--only resnet50,mobilenet_v2] [--out PATH]

``pruning_rows(...)`` is what ``benchmarks/cnn.py`` calls.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nnopt

WORKLOADS = ("resnet50", "mobilenet_v2")
TARGETS = {"resnet50": 2.0, "mobilenet_v2": 1.5}
RECOVERY = {"resnet50": 0, "mobilenet_v2": 60}  # distillation steps; none for the random-init ResNet
RECOVERY_BATCH = 16
RECOVERY_LR = 1e-4
GRADIENT_BATCHES = 4  # batches of RECOVERY_BATCH fitting crops for the gradient importance
EXTRA = ("runtime", "mac_reduction", "speedup_over_mac_reduction", "agreement", "ratio", "channel_multiple",
         "recovery_steps", "prune_seconds")


def pruning_rows(
    model_name: str, model: nn.Module, target_mac_reduction: float, fit_crops: torch.Tensor,
    held_out_crops: torch.Tensor | None, recovery_steps: int, batches: Sequence[int] = (1, 32),
    threads: int | None = None, seconds: float = 6.0, lr: float = RECOVERY_LR,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rows (``benchmarks/_common.py`` protocol) for ``model`` unpruned, pruned by nnopt and by
    torch-pruning at ``target_mac_reduction``× fewer MACs, timed in torch eager and ONNX Runtime at
    each of ``batches``; ``held_out_crops`` None skips agreement (a model with random weights)."""
    from _common import side_by_side_rows

    base = model.eval()
    shape = tuple(fit_crops.shape[1:])
    base_macs = nnopt.profile_model(base, shape).macs
    started = time.perf_counter()
    ours, record = nnopt_variant(base, target_mac_reduction, fit_crops, recovery_steps, lr)
    ours_seconds = time.perf_counter() - started
    multiple = int(record.get("channel_multiple", {}).get("value", 1))
    log(f"{model_name}: nnopt pruned in {ours_seconds:.0f} s (ratio {record['mac_target']['ratio']:.4f}, "
        f"multiple {multiple}; auto: {record.get('channel_multiple', {}).get('auto', {}).get('ps_per_mac')})")
    started = time.perf_counter()
    peer, peer_ratio = torch_pruning_variant(base, target_mac_reduction, fit_crops, recovery_steps, lr, multiple)
    peer_seconds = time.perf_counter() - started
    log(f"{model_name}: torch-pruning pruned in {peer_seconds:.0f} s (ratio {peer_ratio:.4f})")
    steps = recovery_epochs(recovery_steps, len(fit_crops)) * math.ceil(len(fit_crops) / RECOVERY_BATCH)
    variants = {
        ("baseline", "fp32 unpruned"): (base, {}),
        ("nnopt", f"structured, {target_mac_reduction:g}x MACs target, auto multiple"): (ours, {
            "ratio": round(record["mac_target"]["ratio"], 4), "channel_multiple": multiple,
            "prune_seconds": round(ours_seconds, 1), "auto_multiple": record.get("channel_multiple", {}).get("auto"),
        }),
        ("torch-pruning", f"MetaPruner L2, round_to {multiple}, same MACs"): (peer, {
            "ratio": round(peer_ratio, 4), "channel_multiple": multiple, "prune_seconds": round(peer_seconds, 1),
        }),
    }
    info: dict[tuple[str, str], dict[str, Any]] = {}
    reference = None if held_out_crops is None else top1(base, held_out_crops)
    for key, (variant, extra) in variants.items():
        profile = nnopt.profile_model(variant, shape)
        info[key] = {"macs": profile.macs, "params": profile.params,
                     "mac_reduction": round(base_macs / profile.macs, 4),
                     "recovery_steps": steps if key[0] != "baseline" else None, **extra}
        if reference is not None:
            info[key]["agreement"] = round(float((top1(variant, held_out_crops) == reference).float().mean()), 4)
    rows: list[dict[str, Any]] = []
    folded = {key: nnopt.simplify(m, nnopt.FoldBatchNormConfig()).eval() for key, (m, _) in variants.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for i, (key, m) in enumerate(folded.items()):
            path = Path(tmp) / f"v{i}.onnx"
            nnopt.export_onnx(m, torch.zeros(2, *shape), path)
            runners[key] = nnopt.OnnxRunner(str(path), threads=threads)
        for batch in batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            for runtime, models in (("torch eager (BN folded)", folded), ("onnxruntime", runners)):
                log(f"{model_name}: timing {runtime} at batch {batch}")
                calls = {key: functools.partial(m, x) for key, m in models.items()}
                extra = {key: {**info[key], "runtime": runtime} for key in calls}
                timed = side_by_side_rows(model_name, calls, batch, seconds, extra,
                                          min_calls=5 if batch > 8 else 20)
                for r in timed:
                    if r["tool"] != "baseline":
                        r["speedup_over_mac_reduction"] = round(r["speedup_vs_baseline"] / r["mac_reduction"], 3)
                rows += timed
    return rows


def recovery_epochs(steps: int, crops: int) -> int:
    """Epochs over ``crops`` at RECOVERY_BATCH closest to ``steps`` optimizer steps (0: no recovery)."""
    return 0 if steps <= 0 else max(1, round(steps / math.ceil(crops / RECOVERY_BATCH)))


def nnopt_variant(model: nn.Module, target: float, fit: torch.Tensor, recovery_steps: int,
                  lr: float) -> tuple[nn.Module, dict[str, Any]]:
    config = nnopt.StructuredPruneConfig(
        target_mac_reduction=target, channel_multiple="auto", importance="gradient", batches=GRADIENT_BATCHES,
        batch_size=RECOVERY_BATCH, finetune_epochs=recovery_epochs(recovery_steps, len(fit)),
        distill=1.0, lr=lr, seed=0)
    pruned = nnopt.prune(model, config, data=fit)
    from nnopt.lineage import get_lineage

    return pruned.eval(), get_lineage(pruned).applied[-1].details


def torch_pruning_variant(model: nn.Module, target: float, fit: torch.Tensor, recovery_steps: int, lr: float,
                          round_to: int) -> tuple[nn.Module, float]:
    """torch-pruning's MetaPruner, its ratio bisected to the same MACs reduction, then nnopt's recovery."""
    shape = tuple(fit.shape[1:])
    base_macs = nnopt.profile_model(model, shape).macs

    def pruned(ratio: float) -> nn.Module:
        import torch_pruning as tp

        peer = copy.deepcopy(model)
        classifier = [m for m in peer.modules() if isinstance(m, nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(peer, torch.zeros(1, *shape), importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=ratio, ignored_layers=[classifier],
                                      round_to=round_to if round_to > 1 else None)
        pruner.step()
        return peer

    low, high = 0.0, 0.9
    best = None
    for _ in range(10):
        middle = (low + high) / 2
        candidate = pruned(middle)
        if base_macs / nnopt.profile_model(candidate, shape).macs >= target:
            high, best = middle, candidate
        else:
            low = middle
    if best is None:
        best = pruned(high)
    epochs = recovery_epochs(recovery_steps, len(fit))
    if epochs:
        nnopt.train(best, fit, nnopt.TrainConfig(epochs=epochs, batch_size=RECOVERY_BATCH, lr=lr, seed=0),
                    teacher=model, progress=False)
    return best.eval(), high


def top1(model: nn.Module, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def workload_rows(name: str, args: Any) -> list[dict[str, Any]]:
    from _common import log

    from nnopt.models.imagenet_cnns import pretrained_mobilenet_v2
    from nnopt.photos import photo_splits

    splits = photo_splits(fit=240 if not args.quick else 64, held_out=500 if not args.quick else 100, size=224)
    log(f"{name}: {splits.describe()}")
    if name == "mobilenet_v2":
        model, held_out = pretrained_mobilenet_v2(), splits.held_out
    else:
        model, held_out = nnopt.create_model(name, seed=0).eval(), None
    steps = RECOVERY[name] // (4 if args.quick else 1)
    return pruning_rows(name, model, TARGETS[name], splits.fit, held_out, steps, threads=args.threads,
                        seconds=2.0 if args.quick else 8.0, log=log)


def main() -> None:
    from _common import parse_args, run_workloads, write_results

    args, chosen = parse_args(__doc__, "cnn_pruning", WORKLOADS, "fewer crops and recovery steps, shorter timing")
    rows, load_env = run_workloads(args, chosen, {w: functools.partial(workload_rows, w) for w in WORKLOADS})
    import torch_pruning as tp

    write_results("cnn_pruning", rows, args.out, extra_columns=EXTRA, extra_env={
        "torch_pruning": importlib.metadata.version("torch-pruning"), "torch_pruning_reported_version": tp.__version__,
        "onnxruntime": importlib.metadata.version("onnxruntime"), "quick": args.quick,
        "recovery": f"label-free distillation (KL to the unpruned model's logits), Adam lr {RECOVERY_LR}, "
                    f"batch {RECOVERY_BATCH}, about {RECOVERY} steps on fitting crops", **load_env,
    })
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
