"""`nnopt prune`: load a saved model, prune it, optionally fine-tune, save it compressed, and
measure before and after side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from nnopt.checkpoint import CheckpointSpec
from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.lineage import get_lineage
from nnopt.metrics import profile_model
from nnopt.metrics.profile import model_input_shape
from nnopt.pipeline.runs import (
    DATA_HINT,
    QUALITY_NOTE,
    Row,
    RunResult,
    check_fine_tuning,
    commit_output,
    open_run,
    quality_rows,
    run_checkpoint,
    size_rows,
)
from nnopt.pruning import GradualPruneConfig, finetune, prune
from nnopt.saving import save_model
from nnopt.sparse import SparseKernelConfig, kernel_summary, sparsify
from nnopt.training import TrainConfig


def _prune_result(method: str, rows: list[Row], out: Path, kernels: str, labelled: bool = True) -> RunResult:
    notes = (f"{QUALITY_NOTE[labelled]}\nfile bytes: measured on disk;\n"
             "compression ratio: dense fp32 safetensors bytes / bytes written;\n"
             f"{kernels} (measured, median of alternated calls)")
    return RunResult(title=f"nnopt prune: {method}", rows=tuple(rows), out=out, notes=notes)


def run_prune(
    path: str | Path,
    config: Config,
    out: str | Path,
    data_name: str | None = None,
    finetune_epochs: int = 0,
    weights_format: str = "packed",
    overwrite: bool = False,
    kernel_batch: int = 1,
    checkpoint: CheckpointSpec | None = None,
    resume: bool = False,
    data_parallel: int = 1,
    data_options: dict[str, Any] | None = None,
) -> RunResult:
    """Validate everything first, then prune ``path`` into ``out``.

    ``data_name``: bundled data by name or the user's file (:func:`nnopt.datafiles.load_data` with
    ``data_options``); without labels, fine-tuning distils from the input model and quality is fidelity to it.

    Gradual pruning checkpoints its training into ``checkpoint`` (removed once ``out`` is
    written); ``resume`` continues an interrupted run from there. ``data_parallel`` > 1 fine-tunes
    in that many DDP processes.
    """
    out = Path(out)
    gradual = isinstance(config, GradualPruneConfig)
    check_fine_tuning(data_parallel, gradual or bool(finetune_epochs), "--schedule gradual or --epochs N",
                      checkpoint is not None or resume)
    if (gradual or finetune_epochs) and not data_name:
        raise ConfigError(f"fine-tuning needs data: {DATA_HINT}")
    if (checkpoint is not None or resume) and not gradual:
        raise ConfigError("checkpoints and --resume apply to gradual pruning (--schedule gradual)")
    run = open_run(path, out, weights_format, overwrite, data_name, checkpoint=checkpoint, resume=resume,
                   data_options=data_options)
    model, dataset = run.model, run.dataset
    spec = run_checkpoint(run, checkpoint)

    pruned = prune(model, config, data=dataset.train if dataset else None, checkpoint=spec, resume=resume,
                   data_parallel=data_parallel)
    if finetune_epochs and not gradual:
        finetune(pruned, dataset.train, TrainConfig(epochs=finetune_epochs), data_parallel=data_parallel,
                 teacher=model)  # distils from the input model where rows have no labels
    metrics: dict[str, Any] = {}
    quality: list[Row] = []
    if dataset is not None:
        quality, metrics = quality_rows(model, pruned, dataset)
    kernels = "not measured (--kernel-batch 0)"
    if kernel_batch and any(isinstance(m, nn.Linear) for m in pruned.modules()):
        pruned = sparsify(pruned, SparseKernelConfig(batch_size=kernel_batch), inplace=True)
        kernels = kernel_summary(get_lineage(pruned).applied[-1].details)
    before, after = profile_model(model), profile_model(pruned)
    saved = commit_output(run, lambda: save_model(pruned, out, metrics=metrics, inputs=[path], overwrite=overwrite,
                                                  weights_format=weights_format), spec)
    rows = [
        ("non-zero weights", before.nonzeros, after.nonzeros),
        ("zero share of parameters", round(1 - before.nonzeros / before.params, 4),
         round(1 - after.nonzeros / after.params, 4)),
        *size_rows(run.meta, saved),
    ]
    return _prune_result(config.kind, quality + rows, out, kernels, dataset is None or dataset.test.labelled)


def run_structured_prune(
    path: str | Path,
    config: Config,
    out: str | Path,
    data_name: str | None = None,
    weights_format: str = "safetensors",
    overwrite: bool = False,
    data_parallel: int = 1,
    data_options: dict[str, Any] | None = None,
) -> RunResult:
    """Structured pruning of ``path`` into ``out``: a smaller dense model, measured before/after.

    Without labels (a file of inputs only), importance uses the model's own predictions, recovery
    distils from the input model, and quality is fidelity to it.

    Classifiers read ``data_name`` (gradients, recovery, accuracy); a sentence encoder uses the
    bundled sentences (calibration part) for gradients and recovery, and reports the cosine of its
    embeddings to the original's on the evaluation part.
    """
    from nnopt.metrics.speed import compare_latency
    from nnopt.models.hf_encoder import SentenceEncoder

    out = Path(out)
    check_fine_tuning(data_parallel, bool(config.finetune_epochs), "--finetune-epochs E")
    run = open_run(path, out, weights_format, overwrite, data_name, data_options=data_options)
    model, dataset = run.model, run.dataset
    encoder = isinstance(model, SentenceEncoder)
    from nnopt.pruning.structured import NEEDS_GRADIENTS

    reasons = ([f"importance {config.importance!r}"] if config.importance in NEEDS_GRADIENTS else []) + (
        ["fine-tuning"] if config.finetune_epochs else [])
    if reasons and not encoder and dataset is None:
        raise ConfigError(f"{' and '.join(reasons)} need{'s' if len(reasons) == 1 else ''} data: {DATA_HINT}")
    data = dataset.train if dataset else (_sentence_batches() if encoder else None)
    pruned = prune(model, config, data=data, data_parallel=data_parallel)
    metrics: dict[str, Any] = {}
    rows: list[Row] = []
    if dataset is not None:
        quality, metrics = quality_rows(model, pruned, dataset)
        rows += quality
    elif encoder:
        cosine = _encoder_fidelity(model, pruned)
        metrics["cosine_mean"] = cosine.cosine_mean
        rows.append(("embedding cosine to the input (mean / min)", "1 / 1",
                     f"{cosine.cosine_mean:.4f} / {cosine.cosine_min:.4f}"))
    before, after = profile_model(model), profile_model(pruned)
    saved = commit_output(run, lambda: save_model(pruned, out, metrics=metrics, inputs=[path], overwrite=overwrite,
                                                  weights_format=weights_format), None)
    rows += [("parameters", before.params, after.params), ("MACs per example", before.macs, after.macs)]
    if encoder:
        timing = _encoder_latency(model, pruned)
    else:
        stats = compare_latency({"before": model, "after": pruned}, model_input_shape(model), (1, 32),
                                min_seconds=1.0)
        timing = {b: (stats["before"].at(b).median_ms, stats["after"].at(b).median_ms) for b in (1, 32)}
    for batch, (old, new) in timing.items():
        rows.append((f"latency batch {batch}, ms (measured)", round(old, 3), round(new, 3)))
    rows += size_rows(run.meta, saved)
    groups = get_lineage(pruned).applied[-1].details["groups"]
    widths = ", ".join(f"{name} {g['before']}→{g['after']}" for name, g in list(groups.items())[:8])
    kernels = (f"groups: {widths}{' …' if len(groups) > 8 else ''}; latency: dense kernels, median of "
               "alternated calls")
    return _prune_result(f"{config.kind} ({config.importance})", rows, out, kernels,
                         labelled=dataset is None or dataset.test.labelled)


def _sentence_batches() -> list[dict[str, Any]]:
    from nnopt.models.hf_encoder import encode_batch
    from nnopt.text import load_sentences

    calibration = load_sentences()[240:]
    return [dict(encode_batch(calibration[i : i + 17], pad_to_max_length=False)) for i in (0, 17)]


def _encoder_fidelity(model: nn.Module, pruned: nn.Module) -> Any:
    import torch

    from nnopt.models.hf_encoder import embed_sentences
    from nnopt.text import embedding_fidelity, load_sentences

    evaluation = load_sentences()[:240]
    with torch.inference_mode():
        return embedding_fidelity(embed_sentences(model, evaluation), embed_sentences(pruned, evaluation))


def _encoder_latency(model: nn.Module, pruned: nn.Module) -> dict[int, tuple[float, float]]:
    import functools

    import torch

    from nnopt.metrics.speed import compare_calls

    timing = {}
    for batch in (1, 32):
        inputs = model.example_inputs(batch, torch.Generator().manual_seed(0))
        with torch.inference_mode():
            stats = compare_calls({"before": functools.partial(model, **inputs),
                                   "after": functools.partial(pruned, **inputs)}, batch=batch, warmup=2,
                                  min_calls=3, min_seconds=1.0, rounds=3)
        timing[batch] = (stats["before"].median_ms, stats["after"].median_ms)
    return timing
