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
from nnopt.lineage import get_lineage
from nnopt.metrics.speed import bind_call, compare_calls, example_batch
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
from nnopt.quantization import quantize
from nnopt.saving import save_model
from nnopt.techniques import config_named, technique_for, technique_named

# The CLI's names for the quantization techniques: kinds or presets in the technique registry.
SCHEMES = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight", "cluster", "qat")
# Options the command line always has (their defaults): set on the configs that have the field.
_ALWAYS = {"calib": "calibration_samples", "observer": "observer"}
# Options given only by the user: the scheme's config must have the field, and the scheme not fix it.
_GIVEN = {"group": ("--group", "group_size"), "bits": ("--bits", "bits"), "smoothing": ("--smoothing", "smoothing"),
          "kernels": ("--kernels", "kernels"), "kernel_batch": ("--kernel-batch", "kernel_batch")}


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
    """The config a scheme stands for (its technique in the registry, with the options it takes);
    every field is validated by the config."""
    if options.scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme {options.scheme!r}; known: {', '.join(SCHEMES)}")
    fields = {}
    for option, field in _ALWAYS.items():
        if _takes(options.scheme, field):
            fields[field] = getattr(options, option)
    for option, (flag, field) in _GIVEN.items():
        value = getattr(options, option)
        if value is not None:
            if not _takes(options.scheme, field):
                users = " and ".join(s for s in SCHEMES if _takes(s, field)) or "no scheme"
                raise ConfigError(f"{flag} applies to {users}, not {options.scheme}")
            fields[field] = value
    if options.epochs > 0:  # fine-tuning epochs, whatever the config calls them
        field = next((f for f in ("finetune_epochs", "epochs") if _takes(options.scheme, f)), None)
        if field is None:
            raise ConfigError(f"--epochs applies to cluster and qat, not {options.scheme}")
        fields[field] = options.epochs
    return config_named(options.scheme, **fields)


def _takes(scheme: str, field: str) -> bool:
    """Whether ``scheme``'s config has ``field`` and the scheme leaves it free (int4-weight fixes bits)."""
    technique = technique_named(scheme)
    names = {f.name for f in dataclasses.fields(technique.config_type)}
    return field in names and field not in technique.presets.get(scheme, {})


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
    data_options: dict[str, Any] | None = None,
) -> RunResult:
    """Validate everything first, then quantize ``path`` into ``out``.

    ``data_name``: bundled data by name or the user's file (:func:`nnopt.datafiles.load_data` with
    ``data_options``); without labels, quality is top-1 agreement and output cosine to the input model.

    QAT checkpoints its training into ``checkpoint`` (removed once ``out`` is written);
    ``resume`` continues an interrupted run from there. ``data_parallel`` > 1 fine-tunes (QAT,
    clustering with epochs) in that many DDP processes.
    """
    out = Path(out)
    config = build_config(options)
    technique = technique_for(config)
    trains = technique.trains(config)
    check_fine_tuning(data_parallel, trains, "--scheme qat or --scheme cluster --epochs N",
                      checkpoint is not None or resume)
    needs = technique.needs_data(config)
    if needs and not data_name:
        raise ConfigError(f"{options.scheme} with these options needs data for {needs}: {DATA_HINT}")
    if (checkpoint is not None or resume) and options.scheme != "qat":
        raise ConfigError(f"checkpoints and --resume apply to --scheme qat, not {options.scheme}")
    run = open_run(path, out, weights_format, overwrite, data_name, checkpoint=checkpoint, resume=resume,
                   data_options=data_options)
    model, dataset = run.model, run.dataset
    spec = run_checkpoint(run, checkpoint)
    if dataset is not None and trains and not dataset.train.labelled and options.scheme == "qat":
        raise ConfigError(f"--scheme qat fine-tunes on labels, and {data_name} has none; quantize without training "
                          "(int8-static, int8-dynamic) or give labelled data")

    data = technique.data_for(dataset, config) if dataset else None  # calibration rows, or the training split
    quantized = quantize(model, config, data=data, checkpoint=spec, resume=resume, data_parallel=data_parallel)
    metrics: dict[str, Any] = {}
    rows: list[Row] = []
    if dataset is not None:
        rows, metrics = quality_rows(model, quantized, dataset)
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
    notes = (f"{QUALITY_NOTE[dataset is None or dataset.test.labelled]}\n"
             "file bytes: measured on disk; compression ratio: dense fp32 safetensors bytes / bytes written;\n"
             f"latency: measured on this machine, median of alternated calls, {torch.get_num_threads()} threads "
             "(int8 GEMMs pay off on wide layers; on small ones the quantize/rescale passes cost more than they "
             "save; transformer encoders are fastest through ONNX Runtime: nnopt.export_onnx)")
    return RunResult(title=f"nnopt quantize: {options.scheme}", rows=tuple(rows), out=out, notes=notes)
