"""What the `nnopt prune`, `nnopt quantize` and `nnopt optimize` runs share: checks before any work,
the loaded input (hashed when opened, and again just before the output is committed), checkpoints of
runs that train, and the before/after result."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt.checkpoint import CheckpointSpec, check_start, remove_checkpoint
from nnopt.data import Dataset
from nnopt.datafiles import load_data
from nnopt.errors import ConfigError, IntegrityError, OutputError
from nnopt.io.atomic import check_replaceable, commit_guard, refuse_input_overlap
from nnopt.io.manifest import list_files
from nnopt.io.model_dir import META_FILE, WEIGHT_FILES, SavedModel, read_meta, weights_file
from nnopt.lineage import note_input
from nnopt.loading import load_model
from nnopt.metrics.table import render_table

Row = tuple[str, Any, Any]  # (figure, before, after)


@dataclasses.dataclass(frozen=True)
class RunInput:
    """The loaded input; ``files`` are the sha256 and size of each of its files when it was opened."""

    meta: dict[str, Any]
    model: nn.Module
    dataset: Dataset | None
    path: Path = Path()
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def input_sha256(self) -> str:
        """One hash over the input's files (names, sizes, contents)."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    def check_unchanged(self) -> None:
        """IntegrityError if the input's files differ from when the run opened it."""
        now = list_files(self.path)
        if now != self.files:
            names = sorted(n for n in {*now, *self.files} if now.get(n) != self.files.get(n))
            raise IntegrityError(f"the input {self.path} changed during the run ({', '.join(names[:5])}); "
                                 "its result would not match either version, so nothing was written")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Outputs committed within the block are first checked against an input that changed."""
        with commit_guard(self.check_unchanged):
            yield


DATA_HINT = "add --data digits, or --data FILE (.npz, .npy, .csv, an image folder, .txt; see docs/data.md)"


def open_run(
    path: str | Path, out: Path, weights_format: str, overwrite: bool, data_name: str | None,
    checkpoint: CheckpointSpec | None = None, resume: bool = False, data_options: dict[str, Any] | None = None,
) -> RunInput:
    """Check the output, the format and the checkpoint directory, then hash and load the input
    model (and data: a bundled name or the user's file, read by :func:`nnopt.datafiles.load_data` with
    ``data_options``) — nothing is written."""
    if weights_format not in WEIGHT_FILES:
        raise ConfigError(f"format must be one of {', '.join(WEIGHT_FILES)}, got {weights_format!r}")
    refuse_input_overlap(out, [path])
    check_replaceable(out, (META_FILE, *WEIGHT_FILES.values()) if overwrite else None)
    if checkpoint is not None:
        _check_checkpoint_location(checkpoint.directory, Path(path), Path(out))
        check_start(checkpoint, resume)
    elif resume:
        raise ConfigError("resuming needs a checkpoint directory")
    meta = read_meta(path)
    files = list_files(path)  # before loading: a change from here on is caught before the commit
    model = load_model(path)
    dataset = load_data(data_name, **(data_options or {})) if data_name else None
    if dataset is not None:
        note_input(model, dataset.train.x)  # a user module's sample shape, for its profile and timing
        _check_fits(model, dataset)
    return RunInput(meta, model, dataset, Path(path), files)


NO_CHECKPOINTS = ("--data-parallel runs do not checkpoint: drop --resume, --checkpoint-dir and --checkpoint-every, "
                  "or use --data-parallel 1")


def check_fine_tuning(data_parallel: int, trains: bool, how: str, checkpoints: bool = False) -> None:
    """Refuse ``--data-parallel N`` (N > 1) on a run that does not fine-tune (naming the options
    that do) or that checkpoints."""
    from nnopt.training import check_data_parallel

    if check_data_parallel(data_parallel) > 1 and not trains:
        raise ConfigError(f"--data-parallel applies to runs that fine-tune ({how}); this one does not train")
    if data_parallel > 1 and checkpoints:
        raise ConfigError(NO_CHECKPOINTS)


def _check_checkpoint_location(directory: Path, path: Path, out: Path) -> None:
    refuse_input_overlap(directory, [path])
    if directory.resolve() == out.resolve() or out.resolve() in directory.resolve().parents:
        raise OutputError(f"the checkpoint directory {directory} must lie beside the output {out}, not in it")
    if directory.resolve() in out.resolve().parents:
        raise OutputError(f"the output {out} must not lie inside the checkpoint directory {directory}")


def run_checkpoint(run: RunInput, spec: CheckpointSpec | None) -> CheckpointSpec | None:
    """The spec training uses: tied to this input, and kept until the output is committed."""
    if spec is None:
        return None
    spec = spec.with_identity({"input model": run.input_sha256})
    return dataclasses.replace(spec, remove_on_success=False)


def commit_output(run: RunInput, save: Callable[[], SavedModel], checkpoint: CheckpointSpec | None) -> SavedModel:
    """Save the output (aborted if the input changed meanwhile), then drop the run's checkpoint."""
    with run.guard():
        saved = save()
    if checkpoint is not None:
        remove_checkpoint(checkpoint.directory)
    return saved


def size_rows(meta: dict[str, Any], saved: SavedModel) -> list[Row]:
    """File bytes and compression ratio of the input (from its record) and of the output."""
    old_bytes = meta["files"][weights_file(meta)]["bytes"]
    old_ratio = meta.get("compression_ratio", saved.meta["dense_fp32_bytes"] / old_bytes)
    return [("file bytes", old_bytes, saved.file_bytes),
            ("compression ratio", round(old_ratio, 2), round(saved.compression_ratio, 2))]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Before/after figures of one `nnopt prune`, `nnopt quantize` or `nnopt optimize` run: the ``rows``
    under ``title``, ``notes`` on how each figure was obtained, and the model directory written."""

    title: str
    rows: tuple[Row, ...]
    out: Path
    notes: str

    def __str__(self) -> str:
        table = render_table(("", "before", "after"), list(self.rows), title=self.title)
        return f"{table}\n{self.notes}"


QUALITY_NOTE = {
    True: "accuracy: measured on the held-out test split (training rows only were read before);",
    False: "no labels: top-1 agreement with the input model's predictions and mean cosine of the outputs, measured "
           "on the held-out test split; recovery distilled from the input model;",
}


def quality_rows(before: nn.Module, after: nn.Module, dataset: Dataset) -> tuple[list[Row], dict[str, Any]]:
    """Rows and saved metrics of the quality on the test split: accuracy with labels; without them the
    fidelity of ``after`` to ``before`` (top-1 agreement, mean and min output cosine)."""
    from nnopt.metrics.accuracy import accuracy, fidelity

    if dataset.test.labelled:
        old, new = accuracy(before, dataset.test), accuracy(after, dataset.test)
        return [("accuracy", round(old, 4), round(new, 4))], {"accuracy": new}
    stats = fidelity(after, before, dataset.test)
    rows: list[Row] = [("top-1 agreement with the input (test rows)", 1.0, round(stats.agreement, 4)),
                       ("output cosine to the input (mean / min)", "1 / 1",
                        f"{stats.cosine_mean:.4f} / {stats.cosine_min:.4f}")]
    return rows, {"agreement": stats.agreement, "cosine_mean": stats.cosine_mean, "cosine_min": stats.cosine_min}


def _check_fits(model: nn.Module, dataset: Dataset) -> None:
    if not hasattr(model, "input_shape") or not isinstance(dataset.train.x, torch.Tensor):
        return  # a model without a declared input shape, or named inputs: its first forward pass tells
    shape = tuple(getattr(model, "input_shape", dataset.feature_shape))
    image = (1, 8, 8) if dataset.feature_shape == (64,) else dataset.feature_shape  # digits rows are 8×8 images
    if shape not in (dataset.feature_shape, image):
        raise ConfigError(f"the model takes inputs of shape {shape}, but {dataset.name} rows have "
                          f"{dataset.feature_shape}")
