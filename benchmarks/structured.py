"""structured: channel/head pruning, nnopt's criteria against torch-pruning, side by side in one process.

Workloads (BENCHMARKS.md):
- ``cnn``: the ResNet-style CNN (resnet8) on scikit-learn digits, trained 20 epochs (seed 0). At each
  channel ratio (uniform allocation: the same share of every prunable channel group) nnopt prunes
  with every criterion (gradient, taylor, l1, l2, random) and torch-pruning (MetaPruner with
  MagnitudeImportance p=1 and TaylorImportance, classifier ignored) prunes the same share. Every
  variant then gets the identical recovery: ``nnopt.train`` for RECOVERY_EPOCHS epochs (batch 32,
  Adam lr 1e-3, seed 0) on the training split with the loss nnopt's own recovery uses at
  ``distill=0.5``: half cross-entropy, half knowledge distillation (temperature 4) from the
  unpruned model. (nnopt prunes with ``finetune_epochs=0`` and is fine-tuned by this same loop,
  which is the code path ``finetune_epochs=10, distill=0.5`` runs.) Accuracy on the held-out test
  split before and after recovery. Latency at batch 1, 32 and 1024 (the digits CNN is so small
  that at batch 32 fixed per-operation costs dominate; at 1024 compute does). Uniform ratios give
  the same architecture, hence the same MACs, for every criterion and tool at one ratio: the
  criteria are compared at equal MAC reduction.
- ``minilm``: all-MiniLM-L6-v2 with 2 of 12 heads per layer and 25% of the FFN neurons removed
  (criteria gradient, taylor, l1, random; ``batches=4`` token batches of the 34 calibration
  sentences, gradients from nnopt's unsupervised SimCSE loss), and 3 of 12 heads + 50% FFN with
  gradient; no fine-tuning, except one gradient variant distilled for 2 epochs on the calibration
  sentences (``distill=1.0``, lr 1e-4). Peer: torch-pruning with the same head and FFN shares
  (hidden size left alone). Fidelity: cosine of each variant's sentence embeddings to fp32's
  over the 240 evaluation sentences. Latency at batch 1 and 32 × 128 real tokens (no padding).

MACs and params: ``nnopt.profile_model`` (per sample; MiniLM counts its Linear layers at 128 tokens).
``mac_reduction`` = baseline MACs / variant MACs; ``speedup_over_mac_reduction`` = the row's measured
speed-up / its MAC reduction (1.0 means the latency fell as much as the MACs did).

Latency: every variant of a workload is timed in alternating rounds in the same process on the
same input (nnopt.metrics.speed.compare_calls) at ``--threads``. Training and recovery of the
small CNN run at ``--train-threads`` (default 1: its tiny batches gain nothing from a second
thread, and on a busy machine the threads' synchronization slows it several-fold).

    python benchmarks/structured.py [--quick] [--threads 2] [--train-threads 1] [--only cnn,minilm] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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

WORKLOADS = ("cnn", "minilm")
CRITERIA = ("gradient", "taylor", "l1", "l2", "random")
EXTRA = ("mac_reduction", "speedup_over_mac_reduction", "accuracy_before_recovery", "cosine_mean", "cosine_min")
RECOVERY_EPOCHS = 10
DISTILL, TEMPERATURE = 0.5, 4.0  # nnopt's recovery loss at distill=0.5 (its default temperature)
MINILM_HEAD_RATIO = 2 / 12

_notes: dict[str, str] = {}


def main() -> None:
    quick = "one ratio, fewer epochs, shorter timing; still every tool"
    args, chosen = parse_args(__doc__, "structured", WORKLOADS, quick, extra=(TRAIN_THREADS_OPTION,))
    rows, load_env = run_workloads(args, chosen, RUNNERS)
    import torch_pruning as tp

    write_results(
        "structured", rows, args.out, extra_columns=("macs", "params", *EXTRA),
        extra_env={
            "torch_pruning": importlib.metadata.version("torch-pruning"),
            "torch_pruning_reported_version": tp.__version__,
            "train_threads": args.train_threads, "quick": args.quick, "notes": _notes,
            **load_env,
        },
    )
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


# --------------------------------------------------------------------------- shared helpers


def timed_rows(
    workload: str, variants: dict[tuple[str, str], Callable[[], object]], batch: int, seconds: float,
    extra: dict[tuple[str, str], dict[str, Any]], min_calls: int, rounds: int,
) -> list[dict[str, Any]]:
    """Side-by-side rows (the first variant is the baseline) with the MAC reduction beside each speed-up."""
    rows = side_by_side_rows(workload, variants, batch, seconds, extra, min_calls, rounds)
    base_macs = extra[next(iter(variants))]["macs"]
    for r in rows:
        reduction = base_macs / extra[r["tool"], r["variant"]]["macs"]
        r["mac_reduction"] = round(reduction, 3)
        r["speedup_over_mac_reduction"] = round(r["speedup_vs_baseline"] / reduction, 3)
    return rows


def counts(model: nn.Module, batches: tuple[int, ...] = (1, 32, 1024)) -> dict[str, Any]:
    profile = nnopt.profile_model(model)
    return {"macs": profile.macs, "params": profile.params, **energy_fields(model, batches)}


# --------------------------------------------------------------------------- cnn


def distillation_loss(teacher: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """nnopt's structured-pruning recovery loss at distill=DISTILL: CE mixed with soft-target KD."""
    from nnopt.pruning.structured import distillation_loss as nnopt_loss

    return nnopt_loss(teacher, DISTILL, TEMPERATURE)


def torch_pruning_cnn(model: nn.Module, ratio: float, importance: str, train: Any) -> nn.Module:
    """torch-pruning's MetaPruner: uniform channel ratio, classifier left whole."""
    import torch_pruning as tp

    peer = copy.deepcopy(model)
    if importance == "taylor":
        imp = tp.importance.TaylorImportance()
        peer.eval()  # gradients of the trained network as it runs, as nnopt computes them
        peer.zero_grad()
        generator = torch.Generator().manual_seed(0)
        for i, (x, y) in enumerate(train.batches(32, shuffle=True, generator=generator)):
            if i == 8:  # the 8 batches of 32 that nnopt's default batches=8 reads
                break
            F.cross_entropy(peer(x), y).backward()
    else:
        imp = tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(peer, torch.zeros(1, 64), importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[peer.classifier])
    pruner.step()
    peer.zero_grad(set_to_none=True)
    return peer.eval()


def cnn_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = nnopt.load_digits()
    ratios = (0.5,) if args.quick else (0.25, 0.5, 0.625)
    recovery = 3 if args.quick else RECOVERY_EPOCHS
    with threads(args.train_threads):
        base = nnopt.create_model("resnet8", seed=0)
        nnopt.train(base, data.train, nnopt.TrainConfig(epochs=20, seed=0), progress=False)
    base.eval()
    base_acc = round(accuracy(base, data.test), 4)
    log(f"cnn baseline trained: accuracy {base_acc}")
    variants: dict[tuple[str, str], nn.Module] = {("baseline", "fp32 unpruned"): base}
    extra: dict[tuple[str, str], dict[str, Any]] = {
        ("baseline", "fp32 unpruned"): {**counts(base), "accuracy": base_acc, "accuracy_before_recovery": base_acc}
    }
    teacher = copy.deepcopy(base).eval()
    recover_config = nnopt.TrainConfig(epochs=recovery, batch_size=32, lr=1e-3, seed=0)

    def add(key: tuple[str, str], pruned: nn.Module) -> None:
        before = round(accuracy(pruned, data.test), 4)
        with threads(args.train_threads):
            nnopt.train(pruned, data.train, recover_config, loss=distillation_loss(teacher), progress=False)
        pruned.eval()
        after = round(accuracy(pruned, data.test), 4)
        variants[key] = pruned
        extra[key] = {**counts(pruned), "accuracy": after, "accuracy_before_recovery": before}
        log(f"cnn {key[0]:13s} {key[1]:34s} MACs {extra[key]['macs']:7d}  accuracy {before:.3f} -> {after:.3f}")

    for ratio in ratios:
        for criterion in CRITERIA:
            config = nnopt.StructuredPruneConfig(ratio=ratio, importance=criterion, allocation="uniform",
                                                 finetune_epochs=0, seed=0)
            with threads(args.train_threads):
                pruned = nnopt.prune(base, config, data=data.train)
            add(("nnopt", f"ratio {ratio:g}, {criterion}"), pruned)
        for importance, label in (("l1", "MagnitudeImportance p=1"), ("taylor", "TaylorImportance")):
            with threads(args.train_threads):
                pruned = torch_pruning_cnn(base, ratio, importance, data.train)
            add(("torch-pruning", f"ratio {ratio:g}, {label}"), pruned)
    for ratio in ratios:  # equal MAC reduction across criteria and tools at one ratio
        macs = {extra[k]["macs"] for k in extra if k[1].startswith(f"ratio {ratio:g},")}
        if len(macs) != 1:
            _notes[f"cnn ratio {ratio:g}"] = f"MACs differ between variants: {sorted(macs)}"
    rows = []
    seconds = 0.4 if args.quick else 1.0
    for batch in (1, 32, 1024):
        x = data.test.x.repeat(batch // len(data.test.x) + 1, 1)[:batch]  # 1024 > the 360 test rows
        calls = {key: functools.partial(model, x) for key, model in variants.items()}
        log(f"cnn timing batch {batch}: {len(calls)} variants")
        # Small batches are per-call overhead: many short rounds; the large one is compute: fewer.
        many = batch <= 32
        rows += timed_rows("cnn", calls, batch, seconds, extra, min_calls=20 if many else 5, rounds=20 if many else 5)
    return rows


# --------------------------------------------------------------------------- minilm


def simcse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """nnopt's importance loss for sentence encoders: two dropout views of each sentence match."""
    model.train()
    first, second = model(**batch), model(**batch)
    similarity = first @ second.t() / 0.05
    return F.cross_entropy(similarity, torch.arange(similarity.shape[0]))


def torch_pruning_minilm(
    model: nn.Module, importance: str, head_ratio: float, ratio: float, calib: list[dict[str, torch.Tensor]],
    example: dict[str, torch.Tensor],
) -> nn.Module:
    """torch-pruning's MetaPruner on the BERT encoder: whole heads (prune_num_heads) and FFN neurons;
    every other Linear and the embeddings are ignored so that the hidden size stays."""
    import torch_pruning as tp

    peer = copy.deepcopy(model)
    bert = peer.encoder_model
    attention = [m for m in bert.modules() if hasattr(m, "query") and hasattr(m, "num_attention_heads")]
    num_heads = {lin: m.num_attention_heads for m in attention for lin in (m.query, m.key, m.value)}
    ignored: list[nn.Module] = [bert.embeddings]
    ignored += [m for name, m in bert.named_modules()
                if isinstance(m, nn.Linear) and not name.endswith(("intermediate.dense", "query", "key", "value"))]
    if importance == "taylor":
        imp = tp.importance.TaylorImportance()
        peer.zero_grad()
        for batch in calib:
            simcse_loss(peer, batch).backward()
        peer.eval()
    else:
        imp = tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(
        peer, example, importance=imp, pruning_ratio=ratio, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=head_ratio, ignored_layers=ignored,
        output_transform=lambda out: out.sum(),
    )
    pruner.step()
    for m in attention:  # torch-pruning cuts the weights; the module's head count is ours to update
        m.num_attention_heads = pruner.num_heads[m.query]
        m.all_head_size = m.query.out_features
        assert m.all_head_size == m.num_attention_heads * m.attention_head_size
    peer.zero_grad(set_to_none=True)
    return peer.eval()


def minilm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from nnopt.models.hf_encoder import embed_sentences, encode_batch
    from nnopt.text import embedding_fidelity, load_sentences

    sentences = load_sentences()
    evaluation, calibration = sentences[:240], sentences[240:]
    model = nnopt.create_model("minilm").eval()
    # The two calibration batches quantization.py uses (17 + 17 sentences); batches=4 reads all there are.
    calib = [dict(encode_batch(calibration[i : i + 17], pad_to_max_length=False)) for i in (0, 17)]
    with torch.inference_mode():
        reference = embed_sentences(model, evaluation)
    variants: dict[tuple[str, str], nn.Module] = {("baseline", "fp32"): model}
    extra: dict[tuple[str, str], dict[str, Any]] = {
        ("baseline", "fp32"): {**counts(model, (1, 32)), "cosine_mean": 1.0, "cosine_min": 1.0}
    }

    def add(key: tuple[str, str], pruned: nn.Module, seconds: float) -> None:
        stats = embedding_fidelity(reference, embed_sentences(pruned, evaluation))
        variants[key] = pruned
        extra[key] = {**counts(pruned, (1, 32)), "cosine_mean": round(stats.cosine_mean, 5),
                      "cosine_min": round(stats.cosine_min, 5)}
        log(f"minilm {key[0]:13s} {key[1]:48s} {seconds:5.1f} s  MACs {extra[key]['macs']:,}  "
            f"cosine {stats.cosine_mean:.4f} / {stats.cosine_min:.4f}")

    heads = f"{round(MINILM_HEAD_RATIO * 12)}/12 heads"
    criteria = ("gradient", "l1", "random") if args.quick else ("gradient", "taylor", "l1", "random")
    plans = [(f"{heads} + 25% FFN, {c}", dict(ratio=0.25, head_ratio=MINILM_HEAD_RATIO, importance=c))
             for c in criteria]
    plans.append(("3/12 heads + 50% FFN, gradient", dict(ratio=0.5, head_ratio=0.25, importance="gradient")))
    if not args.quick:
        plans.append((f"{heads} + 25% FFN, gradient, distilled 2 epochs (lr 1e-4)",
                      dict(ratio=0.25, head_ratio=MINILM_HEAD_RATIO, importance="gradient", finetune_epochs=2,
                           distill=1.0, lr=1e-4)))
    for label, fields in plans:
        t0 = time.perf_counter()
        pruned = nnopt.prune(model, nnopt.StructuredPruneConfig(batches=4, seed=0, **fields), data=calib)
        add(("nnopt", label), pruned, time.perf_counter() - t0)
    if not args.quick:  # the classifiers' recovery lr (1e-3) on the encoder: why its default is 1e-4; not timed
        t0 = time.perf_counter()
        config = nnopt.StructuredPruneConfig(ratio=0.25, head_ratio=MINILM_HEAD_RATIO, importance="gradient",
                                             batches=4, finetune_epochs=2, distill=1.0, seed=0, lr=1e-3)
        pruned = nnopt.prune(model, config, data=calib)
        stats = embedding_fidelity(reference, embed_sentences(pruned, evaluation))
        _notes["minilm distilled with lr 1e-3"] = (
            f"{heads} + 25% FFN, gradient, finetune_epochs=2, distill=1.0, lr=1e-3 (the classifiers' default): "
            f"cosine {stats.cosine_mean:.4f} / {stats.cosine_min:.4f} (mean / min), "
            f"{time.perf_counter() - t0:.1f} s; lr 1e-4 row above"
        )
        log("minilm " + _notes["minilm distilled with lr 1e-3"])

    example = dict(encode_batch(evaluation[:2]))
    peers = ("l1",) if args.quick else ("l1", "taylor")
    for importance in peers:
        label = {"l1": "MagnitudeImportance p=1", "taylor": "TaylorImportance (SimCSE loss)"}[importance]
        t0 = time.perf_counter()
        try:
            pruned = torch_pruning_minilm(model, importance, MINILM_HEAD_RATIO, 0.25, calib, example)
        except Exception as exc:  # the peer is optional on this workload: record why it did not run
            _notes[f"minilm torch-pruning {importance}"] = f"failed: {type(exc).__name__}: {exc}"
            log(f"minilm torch-pruning {importance} failed: {exc}")
            continue
        add(("torch-pruning", f"{heads} + 25% FFN, {label}"), pruned, time.perf_counter() - t0)

    rows = []
    for batch in (1, 32):
        inputs = minilm_timing_inputs(batch)
        calls = {key: functools.partial(module, **inputs) for key, module in variants.items()}
        log(f"minilm timing batch {batch}: {len(calls)} variants")
        seconds = (0.5 if batch == 1 else 1.0) if args.quick else (1.5 if batch == 1 else 3.0)
        min_calls = 20 if batch == 1 else (5 if args.quick else 10)
        rows += timed_rows("minilm", calls, batch, seconds, extra, min_calls=min_calls, rounds=min(min_calls, 10))
    return rows


RUNNERS = {"cnn": cnn_rows, "minilm": minilm_rows}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
