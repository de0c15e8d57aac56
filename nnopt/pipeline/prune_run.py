"""`nnopt prune`: load a saved model, prune it, optionally fine-tune, save it compressed, and
measure before and after side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.data import load_dataset
from nnopt.errors import ConfigError
from nnopt.io.atomic import check_replaceable, refuse_input_overlap
from nnopt.io.model_dir import META_FILE, WEIGHT_FILES, load_model, read_meta, save_model, weights_file
from nnopt.lineage import get_lineage
from nnopt.metrics import accuracy, profile_model
from nnopt.metrics.table import render_table
from nnopt.pruning import GradualPruneConfig, finetune, prune
from nnopt.sparse import SparseKernelConfig, kernel_summary, sparsify
from nnopt.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class PruneRun:
    """Before/after figures of one `nnopt prune` run."""

    method: str
    rows: tuple[tuple[str, Any, Any], ...]  # (figure, before, after)
    out: Path
    kernels: str = ""

    def __str__(self) -> str:
        table = render_table(("", "before", "after"), list(self.rows), title=f"nnopt prune: {self.method}")
        notes = ("accuracy: measured on the held-out test split; file bytes: measured on disk;\n"
                 "compression ratio: dense fp32 safetensors bytes / bytes written;\n"
                 f"{self.kernels} (measured, median of alternated calls)")
        return f"{table}\n{notes}"


def run_prune(
    path: str | Path,
    config: Config,
    out: str | Path,
    data_name: str | None = None,
    finetune_epochs: int = 0,
    weights_format: str = "packed",
    overwrite: bool = False,
    kernel_batch: int = 1,
) -> PruneRun:
    """Validate everything first, then prune ``path`` into ``out``."""
    out = Path(out)
    if weights_format not in WEIGHT_FILES:
        raise ConfigError(f"format must be one of {', '.join(WEIGHT_FILES)}, got {weights_format!r}")
    gradual = isinstance(config, GradualPruneConfig)
    if (gradual or finetune_epochs) and not data_name:
        raise ConfigError("fine-tuning needs data: add --data digits")
    refuse_input_overlap(out, [path])
    check_replaceable(out, (META_FILE, *WEIGHT_FILES.values()) if overwrite else None)
    meta = read_meta(path)
    model = load_model(path)
    dataset = load_dataset(data_name) if data_name else None
    if dataset is not None and tuple(model.input_shape) not in (dataset.feature_shape, _image_shape(dataset)):
        raise ConfigError(f"the model takes inputs of shape {tuple(model.input_shape)}, "
                          f"but {dataset.name} rows have {dataset.feature_shape}")

    pruned = prune(model, config, data=dataset.train if dataset else None)
    if finetune_epochs and not gradual:
        finetune(pruned, dataset.train, TrainConfig(epochs=finetune_epochs))
    metrics: dict[str, Any] = {}
    if dataset is not None:
        metrics["accuracy"] = accuracy(pruned, dataset.test)
    kernels = "not measured (--kernel-batch 0)"
    if kernel_batch and any(isinstance(m, nn.Linear) for m in pruned.modules()):
        pruned = sparsify(pruned, SparseKernelConfig(batch_size=kernel_batch), inplace=True)
        kernels = kernel_summary(get_lineage(pruned).applied[-1].details)
    before, after = profile_model(model), profile_model(pruned)
    saved = save_model(pruned, out, metrics=metrics, inputs=[path], overwrite=overwrite,
                       weights_format=weights_format)
    old_bytes = meta["files"][weights_file(meta)]["bytes"]
    rows = [
        ("non-zero weights", before.nonzeros, after.nonzeros),
        ("zero share of parameters", round(1 - before.nonzeros / before.params, 4),
         round(1 - after.nonzeros / after.params, 4)),
        ("file bytes", old_bytes, saved.file_bytes),
        ("compression ratio", round(meta.get("compression_ratio", saved.meta["dense_fp32_bytes"] / old_bytes), 2),
         round(saved.compression_ratio, 2)),
    ]
    if dataset is not None:
        rows.insert(0, ("accuracy", round(accuracy(model, dataset.test), 4), round(metrics["accuracy"], 4)))
    return PruneRun(method=config.kind, rows=tuple(rows), out=out, kernels=kernels)


def _image_shape(dataset: Any) -> tuple[int, ...]:
    # digits rows (64,) are also 1×8×8 images for the CNN
    return (1, 8, 8) if dataset.feature_shape == (64,) else dataset.feature_shape
