"""own_models: every nnopt technique on four models written by a user, with torch's and torch-pruning's
own tools on the same models and budgets, side by side in one process.

Models (``examples/user_models.py``, plain PyTorch, not in nnopt's registry), each trained briefly
(seed 0, Adam) on generated data whose class decides the input's pattern, so that outputs mean
something:
- ``timeseries_cnn``: TimeSeriesCNN(width 64) on (3, 1024) signals, 5 classes (class = frequency);
- ``mobilenet_se``: MobileNetSE (inverted residuals, depthwise convolutions, SE) on 3×224×224
  images, 10 classes (class = colour and position of a blob);
- ``vit``: TinyViT(image 224, patch 16, dim 192, depth 6, heads 3, MLP 768: ViT-Tiny's shape),
  same images;
- ``lstm``: LSTMClassifier(vocab 10000, embed 128, hidden 256) on 64-token sequences, 4 classes
  (class = which token range dominates).

Variants (tool ``nnopt``): unstructured magnitude 50% and 2:4 (dense kernels: no speed-up expected,
the rows show it), structured pruning at channel ratio 0.5 (L1 importance, uniform, no
fine-tuning), BatchNorm folding, int8 weight-only, int8 dynamic, int8 static (64 calibration
inputs), 4-bit clustering. Peers in the same run: ``torch`` = ``torch.ao.quantization.quantize_dynamic``
(Linear/LSTM/GRU, qint8) and ``torch-pruning`` = MetaPruner with MagnitudeImportance(p=1) at the
same ratio 0.5, classifier ignored. A technique that refuses a model gets a row with its reason
(``refused``) and no timing.

Quality: top-1 agreement and output cosine against fp32 on 256 held-out generated inputs never
used for training or calibration (``accuracy`` on their labels too). Size: bytes of the file
written (``nnopt.save_model``; peers: ``torch.save`` of the state dict). MACs: ``nnopt.profile_model``
(analytic, per sample). Latency: measured, variants alternated in rounds
(nnopt.metrics.speed.compare_calls), at batch 1 and 32, ``--threads`` threads.

    python benchmarks/own_models.py [--quick] [--threads 2] [--only timeseries_cnn,lstm] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import log, parse_args, run_workloads, side_by_side_rows, write_results  # noqa: I001
from torch import nn

import nnopt
from nnopt.errors import NnoptError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import user_models  # noqa: E402
from generated_data import images, signals, token_ids  # noqa: E402

WORKLOADS = ("timeseries_cnn", "mobilenet_se", "vit", "lstm")
EXTRA = ("macs", "params", "mac_reduction", "agreement", "refused")
HELD_OUT = 256


def main() -> None:
    args, chosen = parse_args(__doc__, "own_models", WORKLOADS, "fewer training steps, shorter timing")
    rows, load_env = run_workloads(args, chosen, {w: functools.partial(workload_rows, w) for w in WORKLOADS})
    import torch_pruning as tp

    write_results("own_models", rows, args.out, extra_columns=EXTRA, extra_env={
        "torch_pruning": importlib.metadata.version("torch-pruning"), "torch_pruning_reported_version": tp.__version__,
        "quick": args.quick, **load_env,
    })
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


# --------------------------------------------------------------------------- models and data


# "build" is also the factory that save_model records and reloads with (the constructor arguments included).
SPECS: dict[str, dict[str, Any]] = {
    "timeseries_cnn": {"build": functools.partial(user_models.TimeSeriesCNN, width=64), "data": signals,
                       "shape": (3, 1024), "steps": 150, "lr": 1e-3},
    "mobilenet_se": {"build": functools.partial(user_models.MobileNetSE, classes=10), "data": images,
                     "shape": (3, 224, 224), "steps": 60, "lr": 1e-3},
    "vit": {"build": functools.partial(user_models.TinyViT, image=224, patch=16, dim=192, depth=6, heads=3, mlp=768),
            "data": images, "shape": (3, 224, 224), "steps": 60, "lr": 3e-4},
    "lstm": {"build": functools.partial(user_models.LSTMClassifier, vocab=10000, embed=128, hidden=256),
             "data": token_ids, "shape": (64,), "steps": 300, "lr": 3e-3},
}
RECOVERY_EPOCHS = 2  # label-free distillation after structured pruning, the same loop for both tools
RECOVERY_ROWS = 256


def trained(name: str, quick: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model trained on generated data; the held-out set; RECOVERY_ROWS unlabelled training inputs (the
    first 64 calibrate static int8)."""
    spec = SPECS[name]
    torch.manual_seed(0)
    model = spec["build"]()
    steps = spec["steps"] // (3 if quick else 1)
    x, y = spec["data"](16 * steps, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    model.train()
    for step in range(steps):
        batch = slice(16 * step, 16 * (step + 1))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = spec["data"](HELD_OUT, seed=2)
    log(f"{name}: trained {steps} steps, held-out accuracy {accuracy(model, held_out):.3f}")
    return model, held_out, x[:RECOVERY_ROWS]


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.inference_mode():
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


# --------------------------------------------------------------------------- variants


def nnopt_variants(unlabelled: torch.Tensor) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """nnopt's variants; ``unlabelled`` training inputs (tensors: no labels) for recovery and calibration."""
    structured = nnopt.StructuredPruneConfig(ratio=0.5, head_ratio=0.5, importance="l1", allocation="uniform",
                                             finetune_epochs=RECOVERY_EPOCHS)  # no labels: distils from the input
    calibration = unlabelled[:64]
    return {
        "magnitude 50% (dense kernel)": lambda m: nnopt.prune(m, nnopt.MagnitudePruneConfig(sparsity=0.5)),
        "2:4 (dense kernel)": lambda m: nnopt.prune(m, nnopt.NMPruneConfig(n=2, m=4)),
        "structured ratio 0.5, l1, distilled": lambda m: nnopt.prune(m, structured, data=unlabelled),
        "fold batchnorm": lambda m: nnopt.simplify(m, nnopt.FoldBatchNormConfig()),
        "int8 weight-only": lambda m: nnopt.quantize(m, nnopt.WeightQuantConfig(bits=8)),
        "int8 dynamic": lambda m: nnopt.quantize(m, nnopt.DynamicQuantConfig()),
        "int8 static": lambda m: nnopt.quantize(m, nnopt.StaticQuantConfig(), data=calibration),
        "cluster 4-bit": lambda m: nnopt.quantize(m, nnopt.ClusterConfig(bits=4)),
    }


def torch_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8)


def torch_pruning_variant(model: nn.Module, unlabelled: torch.Tensor) -> nn.Module:
    """torch-pruning's MetaPruner at the same ratio, then the recovery nnopt's variant gets: label-free
    distillation from the unpruned model for RECOVERY_EPOCHS on the same inputs (nnopt.train)."""
    import torch_pruning as tp

    peer = copy.deepcopy(model)
    classifier = [m for m in peer.modules() if isinstance(m, nn.Linear)][-1]
    heads = {m: m.num_heads for m in peer.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(peer, unlabelled[:2], importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[classifier], num_heads=heads,
                                  prune_num_heads=bool(heads), head_pruning_ratio=0.5)
    before = sum(p.numel() for p in peer.parameters())
    pruner.step()
    if sum(p.numel() for p in peer.parameters()) == before:
        raise ValueError("torch-pruning removed nothing from this model (no prunable dependency group)")
    nnopt.train(peer, unlabelled, nnopt.TrainConfig(epochs=RECOVERY_EPOCHS, batch_size=32), teacher=model,
                progress=False)
    return peer.eval()


def file_bytes(model: nn.Module, tool: str, factory: Callable[[], nn.Module]) -> int:
    if tool == "torch-pruning" or tool == "torch":
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return len(buffer.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        return nnopt.save_model(model, Path(tmp) / "m", factory=factory).file_bytes


def workload_rows(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    base, held_out, unlabelled = trained(name, args.quick)
    shape = SPECS[name]["shape"]
    base_macs = nnopt.profile_model(base, shape).macs
    candidates: dict[tuple[str, str], Callable[[], nn.Module]] = {("baseline", "fp32"): lambda: base}
    for variant, make in nnopt_variants(unlabelled).items():
        candidates["nnopt", variant] = functools.partial(make, base)
    candidates["torch", "quantize_dynamic qint8"] = functools.partial(torch_dynamic, base)
    candidates["torch-pruning", "ratio 0.5, MagnitudeImportance p=1, distilled"] = functools.partial(
        torch_pruning_variant, base, unlabelled)
    models: dict[tuple[str, str], nn.Module] = {}
    extra: dict[tuple[str, str], dict[str, Any]] = {}
    refused: list[dict[str, Any]] = []
    with torch.inference_mode():
        reference = base(held_out[0])
    for key, make in candidates.items():
        try:
            model = make().eval()
            with torch.inference_mode():
                out = model(held_out[0])
        except (NnoptError, RuntimeError, ValueError, NotImplementedError, AssertionError) as exc:
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            log(f"{name} {key}: refused: {reason}")
            refused.append({"workload": name, "tool": key[0], "variant": key[1], "refused": reason})
            continue
        # torch's quantized modules are unknown to nnopt's MAC counter: their MACs are the baseline's
        profile = None if key[0] == "torch" else nnopt.profile_model(model, shape)
        macs = None if profile is None else profile.macs
        agree = float((out.argmax(-1) == reference.argmax(-1)).float().mean())
        cosine = F.cosine_similarity(out.flatten(1).double(), reference.flatten(1).double(), dim=-1)
        try:
            size = file_bytes(model, key[0], SPECS[name]["build"])
        except NnoptError as exc:
            size = None
            log(f"{name} {key}: not saved: {exc}")
        models[key] = model
        extra[key] = {"accuracy": round(accuracy(model, held_out), 4), "agreement": round(agree, 4),
                      "cosine_mean": round(float(cosine.mean()), 5), "cosine_min": round(float(cosine.min()), 5),
                      "file_bytes": size, "macs": macs, "params": None if profile is None else profile.params,
                      "mac_reduction": round(base_macs / macs, 3) if macs else None}
        log(f"{name} {key}: agreement {agree:.3f}, MACs {macs}")
    rows = []
    for batch in (1, 32):
        x = held_out[0][:batch]
        calls = {key: functools.partial(model, x) for key, model in models.items()}
        seconds = (0.3 if args.quick else 1.0) * (1 if batch == 1 else 3)
        rows += side_by_side_rows(name, calls, batch, seconds, extra, min_calls=5 if batch > 1 else 20, rounds=5)
    from _common import row

    for r in refused:
        rows.append({**row(workload=r["workload"], tool=r["tool"], variant=r["variant"]), "refused": r["refused"]})
    return rows


if __name__ == "__main__":
    main()
