"""Per-layer profile: shapes, parameters, non-zeros, MACs, storage dtype and bytes.

MACs are counted with forward hooks on one sample and are the multiply-accumulates a dense
kernel executes (zeros included): an analytic count, not a measurement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from nnopt.metrics.table import markdown_table, render_table

_PROFILE_COLUMNS = ("layer", "type", "weight shape", "params", "non-zeros", "sparsity", "MACs", "dtype", "bytes")


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    name: str
    type: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    macs: int
    dtype: str
    bytes: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    def row(self) -> tuple[object, ...]:
        shape = "×".join(map(str, self.shape)) or "-"
        return (self.name, self.type, shape, self.params, self.nonzeros, round(self.sparsity, 4),
                self.macs, self.dtype, self.bytes)


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """Per-layer rows and totals. ``macs`` are per sample (batch 1)."""

    layers: tuple[LayerProfile, ...]
    file_bytes: int | None = None

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def tensor_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def _rows(self) -> list[tuple[object, ...]]:
        total = LayerProfile("total", "", (), self.params, self.nonzeros, self.macs, "", self.tensor_bytes)
        return [layer.row() for layer in self.layers] + [total.row()]

    def _caption(self) -> str:
        text = "MACs: per sample, counted analytically for a dense kernel (zeros included)."
        if self.file_bytes is not None:
            text += f" Weights file: {self.file_bytes:,} bytes (measured on disk)."
        return text

    def __str__(self) -> str:
        return render_table(_PROFILE_COLUMNS, self._rows(), caption=self._caption())

    def to_markdown(self) -> str:
        return markdown_table(_PROFILE_COLUMNS, self._rows()) + "\n\n" + self._caption()

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": [{**dataclasses.asdict(layer), "shape": list(layer.shape), "sparsity": layer.sparsity}
                       for layer in self.layers],
            "params": self.params, "nonzeros": self.nonzeros, "macs": self.macs,
            "tensor_bytes": self.tensor_bytes, "file_bytes": self.file_bytes,
            "macs_method": "analytic count for a dense kernel, per sample",
        }


def profile_model(model: nn.Module, input_shape: Sequence[int] | None = None,
                  file_bytes: int | None = None) -> ModelProfile:
    """Profile every leaf module that holds weights or performs MACs, in model order."""
    from nnopt.layers.protocol import CompressedLayer

    shape = tuple(input_shape or model_input_shape(model))
    macs = count_macs(model, shape)
    layers = []
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()):
            continue
        tensors = _weight_tensors(module)
        if not tensors and not macs.get(name):
            continue
        main = tensors[0] if tensors else None
        layers.append(LayerProfile(
            name=name,
            type=type(module).__name__,
            shape=tuple(main.shape) if main is not None else (),
            params=sum(t.numel() for t in tensors),
            nonzeros=sum(int(torch.count_nonzero(t)) for t in tensors),
            macs=macs.get(name, 0),
            dtype=module.weight_storage if isinstance(module, CompressedLayer) else (
                str(main.dtype).removeprefix("torch.") if main is not None else "-"
            ),
            bytes=sum(t.numel() * t.element_size() for t in module.state_dict().values()),
        ))
    return ModelProfile(layers=tuple(layers), file_bytes=file_bytes)


def model_input_shape(model: nn.Module) -> tuple[int, ...]:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no input_shape; pass input_shape=...")
    return tuple(shape)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-accumulates per sample of each Linear/Conv-like leaf, via forward hooks."""
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            counts[name] = counts.get(name, 0) + layer_macs(module, output)
        return fn

    try:
        for name, module in model.named_modules():
            if name and not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(hook(name)))
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Linear- or Conv-like layer that returned ``output``
    (for a compressed layer: of the dense layer it stands for); 0 for anything else."""
    from nnopt.layers.protocol import CompressedLayer, conv_macs, linear_macs

    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, CompressedLayer):
        return module.macs(output)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return 0
    if hasattr(module, "in_features"):  # Linear-like: (batch, ..., out) outputs, in MACs each
        return linear_macs(module.in_features, output)
    if hasattr(module, "in_channels") and weight.ndim >= 3:  # Conv-like: per output element
        return conv_macs(weight.shape, output)
    return 0


def _weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's own weights: its parameters, and a compressed layer's weight as the dense values it
    stands for (so counts mean the same for every storage); not scales or BN statistics."""
    from nnopt.layers.protocol import CompressedLayer

    tensors = [p for p in module.parameters(recurse=False)]
    if isinstance(module, CompressedLayer):
        tensors.insert(0, module.dense_weight().detach())
    return tensors
