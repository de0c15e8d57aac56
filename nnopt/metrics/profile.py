"""Per-layer profile: shapes, parameters, non-zeros, MACs, storage dtype and bytes.

MACs are counted with forward hooks on one sample and are the multiply-accumulates a dense
kernel executes (zeros included): an analytic count, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

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
                  file_bytes: int | None = None, input_dtype: torch.dtype | None = None) -> ModelProfile:
    """Profile every leaf module that holds weights or performs MACs, in model order.

    ``input_shape`` is one sample's shape (default: the model's ``input_shape``); ``input_dtype``
    that of its values (default: integer ids for a model that starts with an embedding, else the
    model's float dtype).
    """
    from nnopt.layers.protocol import CompressedLayer

    shape = tuple(input_shape or model_input_shape(model))
    macs = count_macs(model, shape, input_dtype)
    layers = []
    for name, module in model.named_modules():
        parent = any(True for _ in module.children())
        if parent and not macs.get(name) and not any(True for _ in module.parameters(recurse=False)):
            continue  # a container: its layers have rows of their own (parameters it holds itself get one)
        tensors = _weight_tensors(module)
        if not tensors and not macs.get(name):
            continue
        main = tensors[0] if tensors else None
        layers.append(LayerProfile(
            name=name or "(model)",
            type=type(module).__name__,
            shape=tuple(main.shape) if main is not None else (),
            params=sum(t.numel() for t in tensors),
            nonzeros=sum(int(torch.count_nonzero(t)) for t in tensors),
            macs=macs.get(name, 0),
            dtype=module.weight_storage if isinstance(module, CompressedLayer) else (
                str(main.dtype).removeprefix("torch.") if main is not None else "-"
            ),
            # its own saved tensors: a composite's children (an attention's out_proj) have rows of their own
            bytes=sum(t.numel() * t.element_size() for key, t in module.state_dict(keep_vars=True).items()
                      if "." not in key),
        ))
    return ModelProfile(layers=tuple(layers), file_bytes=file_bytes)


def model_input_shape(model: nn.Module) -> tuple[int, ...]:
    """One sample's shape: the model's ``input_shape``, or what a user module's record remembers from the
    data it was optimized with."""
    from nnopt.errors import ConfigError
    from nnopt.lineage import recorded_input

    shape = getattr(model, "input_shape", None)
    if shape is None:
        recorded = recorded_input(model)
        if recorded is None:
            raise ConfigError(f"{type(model).__name__} has no input_shape and no data it was optimized with; "
                              "pass input_shape=... (CLI: --data)")
        shape = recorded[0]
    return tuple(shape)


def probe_input(model: nn.Module, batch: int, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeros of ``(batch, *shape)`` that ``model`` accepts: integer ids (0 is a valid one) when its first
    weighted layer is an embedding, else its float dtype (whole numbers: token ids for text encoders too)."""
    from nnopt.lineage import recorded_input

    recorded = recorded_input(model)
    if dtype is None and recorded is not None and tuple(shape) == recorded[0]:
        named = getattr(torch, recorded[1], None)
        dtype = named if isinstance(named, torch.dtype) else None
    if dtype is None:
        first = next((m for m in model.modules() if not any(True for _ in m.children())
                      and any(True for _ in (*m.parameters(recurse=False), *m.buffers(recurse=False)))), None)
        lookup = isinstance(first, nn.Embedding) or getattr(first, "reads_indices", False)
        dtype = torch.int64 if lookup else next(
            (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.zeros(batch, *shape, dtype=dtype)


def random_input(model: nn.Module, batch: int, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Timing inputs of ``(batch, *shape)``: standard-normal values, or id 0 for a model that reads token ids
    (an embedding costs the same for every id)."""
    zeros = probe_input(model, batch, shape)
    if not zeros.is_floating_point():
        return zeros
    return torch.randn(batch, *shape, generator=generator, dtype=zeros.dtype)


def _is_composite(module: nn.Module) -> bool:
    """A layer that computes with its children's weights without calling them (its MACs are its own)."""
    return isinstance(module, nn.MultiheadAttention) or callable(getattr(module, "composite_macs", None))


def hooked_forward(
    model: nn.Module, inputs: torch.Tensor, on_call: Callable[[str, nn.Module, tuple, Any], None]
) -> None:
    """Run ``model`` once in eval mode and inference mode, calling ``on_call(name, module, args, output)``
    after each leaf layer (and each composite layer such as ``nn.MultiheadAttention``) runs."""
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            on_call(name, module, (*args, *kwargs.values()), output)
        return fn

    was_training = model.training
    try:
        for name, module in model.named_modules():
            leaf = not any(True for _ in module.children())
            inside_composite = any(name.startswith(f"{outer}.") for outer in _composites(model))
            adds_own = callable(getattr(module, "own_macs", None))  # its children are hooked too
            if name and (leaf or _is_composite(module) or adds_own) and not inside_composite:
                handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
        model.eval()
        with torch.inference_mode():
            model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def _composites(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and _is_composite(m)]


def count_macs(model: nn.Module, input_shape: Sequence[int], input_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Multiply-accumulates per sample of each Linear/Conv/recurrent/attention layer, via forward hooks."""
    counts: dict[str, int] = {}

    def on_call(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        counts[name] = counts.get(name, 0) + layer_macs(module, output, args)

    hooked_forward(model, probe_input(model, 1, input_shape, input_dtype), on_call)
    return counts


def layer_macs(module: nn.Module, output: Any, args: Sequence[Any] = ()) -> int:
    """Multiply-accumulates of one call of a Linear-, Conv-, recurrent or attention layer that returned
    ``output`` for the positional ``args`` (for a compressed layer: of the dense layer it stands for);
    0 for anything else."""
    from nnopt.layers.protocol import CompressedLayer, attention_macs, conv_macs, linear_macs, recurrent_macs

    own = getattr(module, "composite_macs", None)
    if callable(own):  # a compressed recurrent or attention layer computing with its parts' weights
        return int(own(output, args))
    extra = getattr(module, "own_macs", None)
    if callable(extra):  # a container whose layers are counted on their own, plus products of its own
        return int(extra(output, args))
    if isinstance(module, nn.MultiheadAttention):
        return attention_macs(module.embed_dim, module.kdim, module.vdim, module.batch_first, output, args)
    if isinstance(module, nn.RNNBase):
        weights = sum(getattr(module, n).numel() for n in module._flat_weights_names if n.startswith("weight_"))
        return recurrent_macs(weights, output)
    if isinstance(module, CompressedLayer):  # a recurrent one returns (outputs, state): its cost follows the outputs
        main = output[0] if isinstance(output, tuple) and output else output
        return module.macs(main) if isinstance(main, torch.Tensor) else 0
    if not isinstance(output, torch.Tensor):
        return 0
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and args and isinstance(args[0], torch.Tensor):
        # each input element is spread over (out / groups) × kernel outputs; weight (in, out / groups, *kernel)
        return args[0].numel() * math.prod(weight.shape[1:])
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
