"""`nnopt prune`: load a saved model, prune it, optionally fine-tune, save it compressed, and
measure before and after side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.io.model_dir import save_model
from nnopt.lineage import get_lineage
from nnopt.metrics import accuracy, profile_model
from nnopt.pipeline.runs import Row, open_run, render_run, size_rows
from nnopt.pruning import GradualPruneConfig, finetune, prune
from nnopt.sparse import SparseKernelConfig, kernel_summary, sparsify
from nnopt.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class PruneRun:
    """Before/after figures of one `nnopt prune` run."""

    method: str
    rows: tuple[Row, ...]
    out: Path
    kernels: str = ""

    def __str__(self) -> str:
        notes = ("accuracy: measured on the held-out test split; file bytes: measured on disk;\n"
                 "compression ratio: dense fp32 safetensors bytes / bytes written;\n"
                 f"{self.kernels} (measured, median of alternated calls)")
        return render_run(f"nnopt prune: {self.method}", self.rows, notes)


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
    gradual = isinstance(config, GradualPruneConfig)
    if (gradual or finetune_epochs) and not data_name:
        raise ConfigError("fine-tuning needs data: add --data digits")
    run = open_run(path, out, weights_format, overwrite, data_name)
    model, dataset = run.model, run.dataset

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
    rows = [
        ("non-zero weights", before.nonzeros, after.nonzeros),
        ("zero share of parameters", round(1 - before.nonzeros / before.params, 4),
         round(1 - after.nonzeros / after.params, 4)),
        *size_rows(run.meta, saved),
    ]
    if dataset is not None:
        rows.insert(0, ("accuracy", round(accuracy(model, dataset.test), 4), round(metrics["accuracy"], 4)))
    return PruneRun(method=config.kind, rows=tuple(rows), out=out, kernels=kernels)

