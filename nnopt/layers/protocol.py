"""The compressed-layer protocol: what every layer class nnopt creates tells the rest of nnopt.

Profile, energy, saving and the Keras exporter ask a layer only through :class:`CompressedLayer`;
none of them imports a layer class, so a new layer type is one class in :mod:`nnopt.layers` that
implements these few members.

>>> import torch
>>> from nnopt.layers.int8 import Int8StaticLinear
>>> layer = Int8StaticLinear(torch.nn.Linear(4, 2))
>>> isinstance(layer, CompressedLayer), layer.stored_codes(), layer.weight_storage
(True, {'weight_q': 8}, 'int8')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

ExtraOp = tuple[str, str, int]  # (operation, dtype, count): e.g. ("multiply", "fp32", 4096)


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """What one call of a layer executes and moves, for the energy estimate.

    ``macs`` are the multiply-accumulates its kernel really executes (a CSR kernel: one per stored
    non-zero per row); ``weight_bytes`` the weight bytes it reads; ``extra_bytes`` activation bytes it
    writes and reads beyond its inputs and output (an int8 layer's activation codes).
    """

    kernel: str
    dtype: str  # arithmetic dtype of the MACs: "int8", "fp32", "bf16", ...
    macs: int
    weight_bytes: int
    extra_ops: tuple[ExtraOp, ...] = ()
    extra_bytes: int = 0


@runtime_checkable
class CompressedLayer(Protocol):
    """A layer whose weight nnopt stores in a compressed form (codes, a codebook, CSR, ...)."""

    @property
    def weight_storage(self) -> str:
        """How the weight is stored, for profiles: "int8", "int4 (packed)", "codebook 4-bit", "csr float32"."""
        ...

    @property
    def keras_layer(self) -> str | None:
        """"Dense" or "Conv2D" when Keras computes the same from :meth:`dense_weight` and ``bias``; else None."""
        ...

    def weight_codes(self) -> torch.Tensor | None:
        """One integer code per weight, in the weight's shape (None: the weight is stored as floats)."""
        ...

    def stored_codes(self) -> dict[str, int]:
        """State-dict entries (names relative to the layer) holding integer codes, with their bit widths:
        the packed format stores each in exactly that many bits."""
        ...

    def dense_weight(self) -> torch.Tensor:
        """The float weight the layer computes with, in the shape of the layer it replaced."""
        ...

    def macs(self, output: torch.Tensor) -> int:
        """Multiply-accumulates of the dense layer it stands for, for a call that returned ``output``."""
        ...

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        """What this call executed on this machine (the kernel the layer really takes here)."""
        ...

    def check_loaded(self) -> None:
        """Raise :class:`nnopt.errors.ModelFormatError` if loaded values break the layer's invariants."""
        ...


def compressed_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """The model's compressed layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLayer)}


# -- shared helpers for implementations -----------------------------------------------------------


def linear_macs(in_features: int, output: torch.Tensor) -> int:
    """A Linear-like layer: ``in_features`` MACs per output element."""
    return output.numel() * in_features


def conv_macs(weight_shape: Sequence[int], output: torch.Tensor) -> int:
    """A convolution: (in_channels / groups) × kernel area MACs per output element (the weight's
    shape is (out, in / groups, *kernel))."""
    per_output = 1
    for size in weight_shape[1:]:
        per_output *= int(size)
    return output.numel() * per_output


def recurrent_macs(weight_elements: int, output: Any) -> int:
    """A recurrent layer (LSTM/GRU/RNN): every time step of every sequence multiplies each of its weight
    matrices once, so ``weight_elements`` (their total size) MACs per step. ``output`` is what it returned
    (``(outputs, state)``; outputs a tensor or a PackedSequence)."""
    out = output[0] if isinstance(output, tuple) else output
    data = getattr(out, "data", out)  # a PackedSequence holds the steps of all sequences in .data
    if not isinstance(data, torch.Tensor) or data.ndim < 2:
        return 0
    return data.numel() // data.shape[-1] * weight_elements


def attention_macs(embed_dim: int, kdim: int, vdim: int, batch_first: bool, output: Any, args: Sequence[Any]) -> int:
    """Multi-head attention called on ``args`` (query, key, value first): the q/k/v and output projections,
    plus the scores (q·kᵀ) and the weighted sum of values, summed over heads."""
    out = output[0] if isinstance(output, tuple) else output
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not isinstance(out, torch.Tensor) or len(tensors) < 3:
        return 0
    query, key, value = tensors[:3]
    e = embed_dim
    batch = (out.shape[0] if batch_first else out.shape[1]) if out.ndim == 3 else 1
    q_tokens, k_tokens, v_tokens = query.numel() // e, key.numel() // kdim, value.numel() // vdim
    projections = q_tokens * e * e + k_tokens * kdim * e + v_tokens * vdim * e + q_tokens * e * e
    return projections + 2 * q_tokens * (k_tokens // batch) * e


def attention_score_macs(inner: int, batch_first: bool, output: Any, args: Sequence[Any]) -> int:
    """The products attention computes between activations, beside its projections: q·kᵀ and the weighted
    sum of values, ``2 · query tokens · key length · inner`` (inner = heads · head size)."""
    out = output[0] if isinstance(output, tuple) else output
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not isinstance(out, torch.Tensor) or len(tensors) < 2:
        return 0
    query, key = tensors[:2]
    if query.ndim == 3:
        batch, q_len, k_len = (query.shape[0], query.shape[1], key.shape[1]) if batch_first else (
            query.shape[1], query.shape[0], key.shape[0])
    else:
        batch, q_len, k_len = 1, query.shape[0], key.shape[0]
    return 2 * batch * q_len * k_len * inner


def copy_conv_geometry(layer: Any, source: nn.Conv2d) -> None:  # Any: plain attributes, not submodules
    """Give ``layer`` the channels, kernel size, stride, padding, dilation and groups of ``source``."""
    layer.in_channels, layer.out_channels = source.in_channels, source.out_channels
    layer.kernel_size, layer.stride, layer.padding = source.kernel_size, source.stride, source.padding
    layer.dilation, layer.groups = source.dilation, source.groups


def conv_repr(layer: nn.Module, extra: str) -> str:
    """``extra_repr`` of a Conv2d-like layer: its geometry, then ``extra`` (", bits=8", ...)."""
    return (f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
            f"stride={layer.stride}{extra}")


def own_bytes(module: nn.Module) -> int:
    """Bytes of the module's own parameters and buffers (not its children's)."""
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def activation_bytes(inputs: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs)


def float_dtype_name(dtype: torch.dtype) -> str:
    """The energy table's name for a float dtype: "fp32", "bf16", "fp16"."""
    return _FLOAT_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


_FLOAT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
