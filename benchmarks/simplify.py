"""simplify: BatchNorm folding and truncated-SVD low-rank Linears, against torch's own fusion, in one process.

Workloads (BENCHMARKS.md):
- ``cnn``: the ResNet-style CNN (resnet8) on scikit-learn digits, trained 10 epochs (seed 0, at
  ``--train-threads``, default 1). Variants: the trained model (eval mode), nnopt's
  ``FoldBatchNormConfig`` (six BatchNorms folded, each replaced by Identity), and torch's
  ``torch.ao.quantization.fuse_modules`` (which calls ``torch.nn.utils.fusion.fuse_conv_bn_eval``)
  fusing every conv+bn, and conv+bn+relu where a ReLU follows directly (torch's ``ConvReLU2d``,
  which in fp32 eager mode runs the conv and the ReLU one after the other). Latency at batch 1, 32
  and 1024 (held-out digits rows, repeated to fill 1024); accuracy on the test split;
  ``max_abs_logit_diff``: largest |logit − baseline logit| over the test split; ``same_predictions``:
  whether every arg-max equals the baseline's.
- ``minilm``: all-MiniLM-L6-v2; nnopt's ``LowRankConfig`` on the FFN Linears of all 6 layers
  (``intermediate.dense`` 384→1536 and ``layer.N.output.dense`` 1536→384) at energy 0.9 and 0.95
  and at fixed rank 256 and 192 (break-even: r·(384+1536) < 384·1536 means r <= 307; layers whose
  rank would not save MACs are left dense, which ``factorized`` counts). No fine-tuning. Fidelity:
  cosine of sentence embeddings to fp32's over the 240 evaluation sentences. Latency at batch 1
  and 32 × 128 real tokens (no padding). No peer: torch has no SVD-factorization pass.

MACs and params: ``nnopt.profile_model`` (per sample; MiniLM counts its Linear layers at 128 tokens).
Latency: variants alternated in rounds in the same process (nnopt.metrics.speed.compare_calls) at
``--threads``.

    python benchmarks/simplify.py [--quick] [--threads 2] [--train-threads 1] [--only cnn,minilm] [--out PATH]
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from _common import (  # noqa: I001  (benchmarks/ is run as a script directory)
    TRAIN_THREADS_OPTION,
    energy_fields,
    log,
    minilm_timing_inputs,
    parse_args,
    run_workloads,
    side_by_side_rows,
    threads,
    write_results,
)
from torch import nn

import nnopt
from nnopt.metrics.accuracy import accuracy
from nnopt.simplification import FoldBatchNormConfig, LowRankConfig, LowRankLinear, simplify

WORKLOADS = ("cnn", "minilm")
EXTRA = ("macs", "params", "max_abs_logit_diff", "same_predictions", "factorized", "ranks", "cosine_mean",
         "cosine_min")
FFN_LAYERS = ("re:intermediate\\.dense$", "re:layer\\.\\d+\\.output\\.dense$")
CNN_EPOCHS = 10



def main() -> None:
    quick = "fewer low-rank variants and shorter timing; still every tool"
    args, chosen = parse_args(__doc__, "simplify", WORKLOADS, quick, extra=(TRAIN_THREADS_OPTION,))
    rows, load_env = run_workloads(args, chosen, RUNNERS)
    write_results(
        "simplify", rows, args.out, extra_columns=EXTRA,
        extra_env={
            "train_threads": args.train_threads, "quick": args.quick,
            **load_env,
        },
    )
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def timed_rows(
    workload: str, calls: dict[tuple[str, str], Callable[[], object]], batch: int, seconds: float,
    extra: dict[tuple[str, str], dict[str, Any]], min_calls: int,
) -> list[dict[str, Any]]:
    """Time every variant side by side at one batch size (5 alternating rounds); the first is the baseline."""
    return side_by_side_rows(workload, calls, batch, seconds, extra, min_calls, rounds=5)


def counts(model: nn.Module, batches: tuple[int, ...] = (1, 32, 1024)) -> dict[str, Any]:
    profile = nnopt.profile_model(model)
    return {"macs": profile.macs, "params": profile.params, **energy_fields(model, batches)}


# --------------------------------------------------------------------------- cnn


def torch_fused(model: nn.Module) -> nn.Module:
    """torch's own fusion: conv+bn everywhere, conv+bn+relu where the ReLU directly follows."""
    from torch.ao.quantization import fuse_modules

    groups = [["stem.0.0", "stem.0.1", "stem.1"]]
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        groups += [[f"{p}.conv1.0", f"{p}.conv1.1", f"{p}.relu1"], [f"{p}.conv2.0", f"{p}.conv2.1"]]
        if isinstance(block.shortcut, nn.Sequential):
            groups.append([f"{p}.shortcut.0", f"{p}.shortcut.1"])
    return fuse_modules(copy.deepcopy(model).eval(), groups, inplace=False)


def cnn_rows(args: Any) -> list[dict[str, Any]]:
    data = nnopt.load_digits()
    torch.manual_seed(0)
    model = nnopt.create_model("resnet8", seed=0)
    with threads(args.train_threads):
        nnopt.train(model, data.train, nnopt.TrainConfig(epochs=CNN_EPOCHS, seed=0), progress=False)
    model.eval()
    log("cnn trained")
    variants: dict[tuple[str, str], nn.Module] = {
        ("baseline", "fp32 (conv, bn)"): model,
        ("nnopt", "fold-batchnorm"): simplify(model, FoldBatchNormConfig()).eval(),
        ("torch", "fuse_modules conv+bn(+relu)"): torch_fused(model),
    }
    extra: dict[tuple[str, str], dict[str, Any]] = {}
    with torch.inference_mode():
        reference = model(data.test.x)
        for key, module in variants.items():
            logits = module(data.test.x)
            extra[key] = {
                "accuracy": round(accuracy(module, data.test), 4),
                "max_abs_logit_diff": float(f"{(logits - reference).abs().max().item():.3g}"),
                "same_predictions": bool(torch.equal(logits.argmax(-1), reference.argmax(-1))),
                **(counts(module) if key[0] != "torch" else {}),  # profile_model knows nnopt's layers only
            }
    rows = []
    x_all = data.test.x.repeat(-(-1024 // len(data.test)), 1)
    seconds = 0.6 if args.quick else 2.0
    for batch in (1, 32, 1024):
        x = x_all[:batch].contiguous()
        calls = {key: functools.partial(module, x) for key, module in variants.items()}
        rows += timed_rows("cnn", calls, batch, seconds, extra, min_calls=20)
        log(f"cnn batch {batch} timed")
    return rows


# --------------------------------------------------------------------------- minilm


def _lowrank_summary(model: nn.Module) -> dict[str, Any]:
    ranks = [m.rank for m in model.modules() if isinstance(m, LowRankLinear)]
    return {"factorized": f"{len(ranks)}/12", "ranks": f"{min(ranks)}-{max(ranks)}" if ranks else "-"}


def minilm_rows(args: Any) -> list[dict[str, Any]]:
    from nnopt.models.hf_encoder import embed_sentences
    from nnopt.text import embedding_fidelity, load_sentences

    evaluation = load_sentences()[:240]
    model = nnopt.create_model("minilm").eval()
    configs = {
        "svd ffn energy 0.9": LowRankConfig(energy=0.9, layers=FFN_LAYERS),
        "svd ffn energy 0.95": LowRankConfig(energy=0.95, layers=FFN_LAYERS),
        "svd ffn rank 256": LowRankConfig(energy=None, rank=256, layers=FFN_LAYERS),
        "svd ffn rank 192": LowRankConfig(energy=None, rank=192, layers=FFN_LAYERS),
    }
    if args.quick:
        configs = {k: v for k, v in configs.items() if k in ("svd ffn energy 0.9", "svd ffn rank 192")}
    variants: dict[tuple[str, str], nn.Module] = {("baseline", "fp32"): model}
    for name, config in configs.items():
        variants["nnopt", name] = simplify(model, config).eval()
    log("minilm factorized")
    extra: dict[tuple[str, str], dict[str, Any]] = {}
    with torch.inference_mode():
        reference = embed_sentences(model, evaluation)
        for key, module in variants.items():
            stats = embedding_fidelity(reference, embed_sentences(module, evaluation))
            extra[key] = {"cosine_mean": round(stats.cosine_mean, 5), "cosine_min": round(stats.cosine_min, 5),
                          **counts(module, (1, 32)), **(_lowrank_summary(module) if key[0] == "nnopt" else {})}
    log("minilm fidelity measured")
    rows = []
    for batch in (1, 32):
        inputs = minilm_timing_inputs(batch)
        calls = {key: functools.partial(module, **inputs) for key, module in variants.items()}
        seconds = (0.5 if args.quick else 1.5) if batch == 1 else (2.0 if args.quick else 6.0)
        rows += timed_rows("minilm", calls, batch, seconds, extra, min_calls=20 if batch == 1 else 5)
        log(f"minilm batch {batch} timed")
    return rows


RUNNERS = {"cnn": cnn_rows, "minilm": minilm_rows}

if __name__ == "__main__":
    main()
