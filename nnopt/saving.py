"""Saving a model directory: :func:`nnopt.io.model_dir.save_model` with the recorded passes' replays.

This is the save path of the layering, beside :mod:`nnopt.loading` and above the techniques: before a
user's own module is written, its record (the factory that builds the architecture, then each recorded
pass's replay from the technique registry) is rebuilt on the meta device and must give exactly the
model's tensors, so that every directory written loads again.

>>> import nnopt
>>> saved = save_model(nnopt.create_model("simplenet"), "simplenet-dir")
>>> saved.meta["architecture"]
'simplenet'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from nnopt.io.model_dir import SavedModel
from nnopt.io.model_dir import save_model as write_model_dir
from nnopt.techniques import replay_structure

__all__ = ["save_model"]


def save_model(
    model: nn.Module,
    path: str | Path,
    metrics: dict[str, Any] | None = None,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    weights_format: str = "safetensors",
    factory: str | Callable[..., Any] | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
) -> SavedModel:
    """Write ``model`` (any ``nn.Module``) as an nnopt model directory, atomically; see
    :func:`nnopt.io.model_dir.save_model` for the arguments. A user's own module's record is checked
    to rebuild it exactly, recorded passes included.

    >>> save_model(MyNet(width=8), "out/mynet", factory_kwargs={"width": 8})  # doctest: +SKIP
    """
    return write_model_dir(model, path, metrics=metrics, inputs=inputs, overwrite=overwrite,
                           weights_format=weights_format, factory=factory, factory_kwargs=factory_kwargs,
                           replay=replay_structure)
