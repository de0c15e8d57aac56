"""Measurements returned as dataclasses: accuracy, size, MACs, latency."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from nnopt.data import Split, as_split
from nnopt.metrics.accuracy import Fidelity, accuracy, fidelity
from nnopt.metrics.profile import LayerProfile, ModelProfile, model_input_shape, profile_model
from nnopt.metrics.speed import LatencyStats, Timing, compare_latency, measure_latency
from nnopt.metrics.table import render_table

__all__ = [
    "Fidelity", "LatencyStats", "LayerProfile", "compare_latency", "Measurement", "ModelProfile", "Timing", "accuracy",
    "fidelity",
    "measure", "measure_latency", "profile_model",
]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One model measured: accuracy (held-out), counts, file size and latency."""

    name: str
    accuracy: float | None
    params: int
    nonzeros: int
    macs: int
    file_bytes: int | None
    latency: LatencyStats | None
    compression_ratio: float | None = None
    fidelity: Fidelity | None = None  # against the reference model (unlabelled data, or when one is given)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name, "accuracy": self.accuracy, "params": self.params,
            "nonzeros": self.nonzeros, "file_bytes": self.file_bytes, "compression_ratio": self.compression_ratio,
            "macs": self.macs,
            "latency_ms": self.latency.to_dict() if self.latency else None,
        }
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity.to_dict()
        return out

    def __str__(self) -> str:
        return render_table(*measurement_rows([self]))


def measurement_rows(items: Sequence[Measurement]) -> tuple[list[str], list[list[object]]]:
    """Column names and rows for a table of measurements (one row per model)."""
    batches = sorted({t.batch for m in items if m.latency for t in m.latency.timings})
    columns = ["variant", "accuracy", "params", "non-zeros", "MACs", "file bytes", "ratio"]
    columns += [f"ms @{b} (median / p90)" for b in batches]
    rows = []
    for m in items:
        ratio = f"{m.compression_ratio:.1f}×" if m.compression_ratio else "-"
        row: list[object] = [m.name, m.accuracy, m.params, m.nonzeros, m.macs, m.file_bytes, ratio]
        for b in batches:
            t = m.latency.at(b) if m.latency else None
            row.append(f"{t.median_ms:.3f} / {t.p90_ms:.3f}" if t else "-")
        rows.append(row)
    return columns, rows


def measure(
    model: nn.Module,
    data: Split | Any | None = None,
    name: str = "model",
    file_bytes: int | None = None,
    batch_sizes: Sequence[int] = (1, 256),
    min_seconds: float = 2.0,
    latency: LatencyStats | None = None,
    reference: nn.Module | None = None,
) -> Measurement:
    """Measure accuracy on ``data`` (held out; a Split or anything :func:`nnopt.as_dataset` takes), counts,
    and latency at each batch size.

    Pass ``latency`` (from :func:`compare_latency`) to reuse timings taken side by side. With ``reference``
    (the original model) the result also holds its :class:`Fidelity` on ``data`` (top-1 agreement, output
    cosine): the quality figure of unlabelled data, whose ``accuracy`` is None.

    >>> m = measure(model, dataset.test, name="baseline")
    >>> m.accuracy > 0.5  # a trained SimpleNet on held-out digits
    True
    """
    split = None if data is None else as_split(data)
    shape = model_input_shape(model)
    prof = profile_model(model, shape)
    if latency is None and batch_sizes:
        latency = measure_latency(model, shape, batch_sizes, min_seconds=min_seconds)
    return Measurement(
        name=name,
        accuracy=accuracy(model, split) if split is not None and split.labelled else None,
        params=prof.params,
        nonzeros=prof.nonzeros,
        macs=prof.macs,
        file_bytes=file_bytes,
        latency=latency,
        fidelity=fidelity(model, reference, split) if reference is not None and split is not None else None,
    )
