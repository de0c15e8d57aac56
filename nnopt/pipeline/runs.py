"""What the `nnopt prune` and `nnopt quantize` runs share: checks before any work, the loaded
input, and the before/after table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from nnopt.data import Dataset, load_dataset
from nnopt.errors import ConfigError
from nnopt.io.atomic import check_replaceable, refuse_input_overlap
from nnopt.io.model_dir import META_FILE, WEIGHT_FILES, SavedModel, load_model, read_meta, weights_file
from nnopt.metrics.table import render_table

Row = tuple[str, Any, Any]  # (figure, before, after)


@dataclasses.dataclass(frozen=True)
class RunInput:
    meta: dict[str, Any]
    model: nn.Module
    dataset: Dataset | None


def open_run(
    path: str | Path, out: Path, weights_format: str, overwrite: bool, data_name: str | None
) -> RunInput:
    """Check the output and the format, then load the input model (and data set) — nothing is written."""
    if weights_format not in WEIGHT_FILES:
        raise ConfigError(f"format must be one of {', '.join(WEIGHT_FILES)}, got {weights_format!r}")
    refuse_input_overlap(out, [path])
    check_replaceable(out, (META_FILE, *WEIGHT_FILES.values()) if overwrite else None)
    meta = read_meta(path)
    model = load_model(path)
    dataset = load_dataset(data_name) if data_name else None
    if dataset is not None:
        _check_fits(model, dataset)
    return RunInput(meta, model, dataset)


def size_rows(meta: dict[str, Any], saved: SavedModel) -> list[Row]:
    """File bytes and compression ratio of the input (from its record) and of the output."""
    old_bytes = meta["files"][weights_file(meta)]["bytes"]
    old_ratio = meta.get("compression_ratio", saved.meta["dense_fp32_bytes"] / old_bytes)
    return [("file bytes", old_bytes, saved.file_bytes),
            ("compression ratio", round(old_ratio, 2), round(saved.compression_ratio, 2))]


def render_run(title: str, rows: tuple[Row, ...], notes: str) -> str:
    table = render_table(("", "before", "after"), list(rows), title=title)
    return f"{table}\n{notes}"


def _check_fits(model: nn.Module, dataset: Dataset) -> None:
    shape = tuple(getattr(model, "input_shape", dataset.feature_shape))
    image = (1, 8, 8) if dataset.feature_shape == (64,) else dataset.feature_shape  # digits rows are 8×8 images
    if shape not in (dataset.feature_shape, image):
        raise ConfigError(f"the model takes inputs of shape {shape}, but {dataset.name} rows have "
                          f"{dataset.feature_shape}")
