"""Clustered layers (weight clustering, Deep Compression): one uint8 index per weight into a float codebook.

The layer computes with ``codebook[weight_indices]``; a layer with pruned zeros reserves centroid
:data:`ZERO_INDEX`, fixed at 0.0, for them. The pass that creates these layers is
:mod:`nnopt.quantization.clustering`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import ModelFormatError, UnsupportedModelError
from nnopt.layers.conv_geometry import ConvGeometry
from nnopt.layers.protocol import KernelCost, conv_repr, float_dtype_name, linear_macs, own_bytes

ZERO_INDEX = 0  # the reserved zero centroid, when a layer has one: pruned weights are index 0


class _ClusteredWeight(nn.Module):
    """Holds ``weight_indices`` (uint8 buffer, the weight's shape) and ``codebook`` (Parameter)."""

    weight_indices: torch.Tensor

    def _init_clusters(self, shape: torch.Size, bits: int, zero_centroid: bool) -> None:
        self.bits = bits
        self.zero_centroid = zero_centroid
        self.register_buffer("weight_indices", torch.zeros(shape, dtype=torch.uint8))
        self.codebook = nn.Parameter(torch.zeros(2**bits, dtype=torch.float32))

    def set_clusters(self, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        with torch.no_grad():
            self.codebook.copy_(codebook)
            self.weight_indices.copy_(indices)

    def dense_weight(self) -> torch.Tensor:
        """The weight the layer computes with: ``codebook[weight_indices]`` (differentiable)."""
        # index_select on the flat indices: 2–4× faster than advanced indexing with a 2-D index tensor
        # (LeNet-300 forward at batch 1, measured); int32 halves the temporary compared with int64.
        flat = self.weight_indices.reshape(-1).to(torch.int32)
        return self.codebook.index_select(0, flat).view(self.weight_indices.shape)

    @property
    def weight_storage(self) -> str:
        return f"uint8 indices, {2**self.bits}-entry codebook"

    def weight_codes(self) -> torch.Tensor:
        return self.weight_indices

    def stored_codes(self) -> dict[str, int]:
        return {}  # indices stay one byte each in every format (packing them is a later step)

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        """The codebook gather builds the float weight, then a dense float kernel runs."""
        return KernelCost("clustered (codebook gather)", float_dtype_name(self.codebook.dtype), self.macs(output),
                          own_bytes(self))

    def reset_zero_centroid(self) -> None:
        """Put the reserved zero centroid back to exactly 0.0 (after an optimizer step)."""
        if self.zero_centroid:
            with torch.no_grad():
                self.codebook[ZERO_INDEX] = 0.0

    def check_loaded(self) -> None:
        """Reject indices beyond the codebook, non-finite centroids and a moved zero centroid."""
        size = self.codebook.numel()
        if self.weight_indices.numel() and int(self.weight_indices.max()) >= size:
            raise ModelFormatError(f"{type(self).__name__}: weight indices must be < the codebook size {size}")
        if not bool(torch.isfinite(self.codebook).all()):
            raise ModelFormatError(f"{type(self).__name__}: the codebook holds NaN or infinite values")
        if self.zero_centroid and float(self.codebook.detach()[ZERO_INDEX]) != 0.0:
            raise ModelFormatError(f"{type(self).__name__}: the reserved zero centroid is not 0")


class ClusteredLinear(_ClusteredWeight):
    keras_layer = "Dense"

    def __init__(self, source: nn.Linear, bits: int, zero_centroid: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self._init_clusters(source.weight.shape, bits, zero_centroid)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self.in_features, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, clusters={2**self.bits}"


class ClusteredConv(_ClusteredWeight):
    """A convolution (1-D/2-D, plain or transposed, any groups and padding mode) computing with its codebook weight."""

    keras_layer: str | None = None
    geometry: ConvGeometry

    def __init__(self, source: nn.Module, bits: int, zero_centroid: bool = False) -> None:
        super().__init__()
        ConvGeometry.of(source).copy_to(self)
        weight: torch.Tensor = source.weight  # type: ignore[assignment]
        self._init_clusters(weight.shape, bits, zero_centroid)
        bias: torch.Tensor | None = source.bias  # type: ignore[assignment]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def macs(self, output: torch.Tensor) -> int:
        return self.geometry.macs(self.weight_indices.shape, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.geometry.run(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        groups = "" if self.groups == 1 else f", groups={self.groups}"
        return conv_repr(self, f"{groups}, clusters={2**self.bits}")


class ClusteredConv2d(ClusteredConv):
    keras_layer = "Conv2D"  # the Keras exporter itself refuses groups, dilation and padding modes it lacks


class ClusteredConv1d(ClusteredConv):
    pass


class ClusteredConvTranspose1d(ClusteredConv):
    pass


class ClusteredConvTranspose2d(ClusteredConv):
    pass


class ClusteredEmbedding(_ClusteredWeight):
    """An Embedding table as codebook indices; a lookup gathers only the rows it reads."""

    keras_layer = None
    reads_indices = True  # its input is integer ids (profiles and energy probes feed it zeros of int64)

    def __init__(self, source: nn.Embedding, bits: int, zero_centroid: bool = False) -> None:
        super().__init__()
        if source.max_norm is not None or source.sparse:
            raise UnsupportedModelError("clustered Embedding supports tables without max_norm and sparse gradients")
        self.num_embeddings, self.embedding_dim = source.num_embeddings, source.embedding_dim
        self.padding_idx = source.padding_idx
        self._init_clusters(source.weight.shape, bits, zero_centroid)
        self.bias = None

    def macs(self, output: torch.Tensor) -> int:
        return 0  # a lookup

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_indices.index_select(0, ids.reshape(-1)).reshape(-1).to(torch.int32)
        return self.codebook.index_select(0, rows).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, clusters={2**self.bits}"


class ClusteredMatrix(_ClusteredWeight):
    """One weight matrix of a layer that holds several (an LSTM's ``weight_ih_l0``, attention's
    ``in_proj_weight``) as codebook indices. Not called itself: its owner computes with :meth:`dense_weight`."""

    keras_layer = None

    def __init__(self, source: torch.Tensor, bits: int, zero_centroid: bool = False) -> None:
        super().__init__()
        self._init_clusters(source.shape, bits, zero_centroid)

    def macs(self, output: torch.Tensor) -> int:
        return 0  # the owner's call does the arithmetic

    def extra_repr(self) -> str:
        return f"{tuple(self.weight_indices.shape)}, clusters={2**self.bits}"


CLUSTERED_TYPES: dict[type[nn.Module], type[_ClusteredWeight]] = {
    nn.Linear: ClusteredLinear,
    nn.Conv1d: ClusteredConv1d,
    nn.Conv2d: ClusteredConv2d,
    nn.ConvTranspose1d: ClusteredConvTranspose1d,
    nn.ConvTranspose2d: ClusteredConvTranspose2d,
    nn.Embedding: ClusteredEmbedding,
}
