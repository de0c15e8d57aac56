"""`nnopt quantize`: load a saved model, quantize it with one scheme, save it, and measure
before and after side by side (accuracy, file bytes, latency on this machine)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from nnopt.checkpoint import CheckpointSpec
from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.io.model_dir import save_model
from nnopt.lineage import get_lineage
from nnopt.metrics import accuracy
from nnopt.metrics.speed import bind_call, compare_calls, example_batch
from nnopt.passes import run_verb
from nnopt.pipeline.runs import Row, check_fine_tuning, commit_output, open_run, render_run, run_checkpoint, size_rows
from nnopt.quantization import (
    ClusterConfig,
    DynamicQuantConfig,
    QATConfig,
    StaticQuantConfig,
    WeightQuantConfig,
    quantize,
)
from nnopt.quantization.qat import PASS_NAME as QAT_PASS
from nnopt.quantization.qat import quantize_qat

SCHEMES = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight", "cluster", "qat")
NEEDS_DATA = ("int8-static", "qat")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """What the command line says, before it becomes a config."""

    scheme: str
    group: int | None = None
    calib: int = 256
    bits: int | None = None
    epochs: int = 0
    smoothing: float | None = None
    observer: str = "minmax"
    kernels: str | None = None  # None: the config's default
    kernel_batch: int | None = None


def build_config(options: QuantizeOptions) -> Config:
    """The quantization config a scheme name stands for; every field is validated by the config."""
    scheme, group = options.scheme, options.group
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if group is not None and scheme not in ("int8-weight", "int4-weight"):
        raise ConfigError(f"--group applies to int8-weight and int4-weight, not {scheme}")
    if options.bits is not None and scheme != "cluster":
        raise ConfigError(f"--bits applies to cluster (the scheme name fixes the width of {scheme})")
    kernel_options = {k: v for k, v in (("kernels", options.kernels), ("kernel_batch", options.kernel_batch))
                      if v is not None}
    if kernel_options and scheme != "int8-dynamic":
        raise ConfigError(f"--kernels and --kernel-batch apply to int8-dynamic, not {scheme}")
    if scheme == "int8-dynamic":
        return DynamicQuantConfig(smoothing=options.smoothing, calibration_samples=options.calib, **kernel_options)
    if options.smoothing is not None:
        raise ConfigError("--smoothing applies to int8-dynamic only")
    if scheme == "int8-static":
        return StaticQuantConfig(observer=options.observer, calibration_samples=options.calib)
    if scheme in ("int8-weight", "int4-weight"):
        return WeightQuantConfig(bits=8 if scheme == "int8-weight" else 4, per_channel=True, group_size=group)
    if scheme == "cluster":
        return ClusterConfig(bits=options.bits or 4, finetune_epochs=options.epochs)
    return QATConfig(epochs=options.epochs or 3)


def kernel_choice_rows(details: dict[str, Any]) -> list[Row]:
    """With ``kernels="measured"``: how many Linears run int8, and the measured reason for the others."""
    choice = details.get("kernel_choice")
    if choice is None:
        return []
    kept = choice["kept_fp32"]
    int8 = [name for name, info in details["layers"].items() if "measured" in info]
    rows: list[Row] = [("Linear layers on the int8 kernel (measured choice)", len(int8) + len(kept), len(int8))]
    for name, timing in list(kept.items())[:6]:
        rows.append((f"  {name}: stays fp32, ms per call fp32 / int8", timing["fp32_ms"], timing["int8_ms"]))
    return rows


@dataclasses.dataclass(frozen=True)
class QuantizeRun:
    """Before/after figures of one `nnopt quantize` run."""

    scheme: str
    rows: tuple[Row, ...]
    out: Path
    timing_note: str

    def __str__(self) -> str:
        notes = ("accuracy: measured on the held-out test split (calibration used training rows only);\n"
                 "file bytes: measured on disk; compression ratio: dense fp32 safetensors bytes / bytes written;\n"
                 f"latency: {self.timing_note}")
        return render_run(f"nnopt quantize: {self.scheme}", self.rows, notes)


def run_quantize(
    path: str | Path,
    options: QuantizeOptions,
    out: str | Path,
    data_name: str | None = None,
    weights_format: str = "safetensors",
    overwrite: bool = False,
    latency_seconds: float = 0.5,
    checkpoint: CheckpointSpec | None = None,
    resume: bool = False,
    data_parallel: int = 1,
) -> QuantizeRun:
    """Validate everything first, then quantize ``path`` into ``out``.

    QAT checkpoints its training into ``checkpoint`` (removed once ``out`` is written);
    ``resume`` continues an interrupted run from there. ``data_parallel`` > 1 fine-tunes (QAT,
    clustering with epochs) in that many DDP processes.
    """
    out = Path(out)
    config = build_config(options)
    trains = options.scheme == "qat" or (options.scheme == "cluster" and options.epochs > 0)
    check_fine_tuning(data_parallel, trains, "--scheme qat or --scheme cluster --epochs N",
                      checkpoint is not None or resume)
    wants_data = options.scheme in NEEDS_DATA or options.smoothing is not None or options.epochs > 0
    if wants_data and not data_name:
        raise ConfigError(f"{options.scheme} with these options needs calibration or training data: add --data digits")
    if (checkpoint is not None or resume) and options.scheme != "qat":
        raise ConfigError(f"checkpoints and --resume apply to --scheme qat, not {options.scheme}")
    run = open_run(path, out, weights_format, overwrite, data_name, checkpoint=checkpoint, resume=resume)
    model, dataset = run.model, run.dataset
    spec = run_checkpoint(run, checkpoint)

    data = dataset.train.subset(min(options.calib, len(dataset.train))) if dataset else None
    if options.scheme in ("qat", "cluster") and dataset is not None:
        data = dataset.train  # fine-tuning uses the whole training split
    if spec is not None:  # nnopt.quantize takes no checkpoint yet: the same dispatch, with it in the context
        quantized = run_verb("quantization", {QATConfig: (QAT_PASS, quantize_qat)}, model, config, False,
                             data=data, checkpoint=spec, resume=resume)
    else:
        quantized = quantize(model, config, data=data, data_parallel=data_parallel)
    metrics: dict[str, Any] = {}
    rows: list[Row] = []
    if dataset is not None:
        metrics["accuracy"] = accuracy(quantized, dataset.test)
        rows.append(("accuracy", round(accuracy(model, dataset.test), 4), round(metrics["accuracy"], 4)))
    saved = commit_output(run, lambda: save_model(quantized, out, metrics=metrics, inputs=[path],
                                                  overwrite=overwrite, weights_format=weights_format), spec)
    rows += size_rows(run.meta, saved)
    rows += kernel_choice_rows(get_lineage(quantized).applied[-1].details)
    generator = torch.Generator().manual_seed(0)
    for size in (1, 32):
        inputs = example_batch(model, size, generator)
        calls = {name: bind_call(m.eval(), inputs) for name, m in (("before", model), ("after", quantized))}
        with torch.inference_mode():
            timings = compare_calls(calls, size, min_seconds=latency_seconds)
        rows.append((f"latency ms, batch {size}", round(timings["before"].median_ms, 4),
                     round(timings["after"].median_ms, 4)))
    note = (f"measured on this machine, median of alternated calls, {torch.get_num_threads()} threads "
            "(int8 GEMMs pay off on wide layers; on small ones the quantize/rescale passes cost more than they save; "
            "transformer encoders are fastest through ONNX Runtime: nnopt.export_onnx)")
    return QuantizeRun(scheme=options.scheme, rows=tuple(rows), out=out, timing_note=note)
