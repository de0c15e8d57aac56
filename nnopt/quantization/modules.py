"""Layers that store integer weight codes plus scale, and dequantize them to compute in fp32.

This is the storage form of weight quantization: the saved file holds the codes (int8/int16),
so it is ~4× smaller than fp32. The compute path is still fp32 (dequantize per call); real
integer kernels are a separate, measured path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.quantization import primitives as P


class _QuantizedWeight(nn.Module):
    """Holds ``weight_q`` (codes), ``weight_scale`` (S) and ``weight_zero_point`` (z) buffers."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor

    def _init_weight_buffers(self, shape: torch.Size, bits: int, qparam_shape: tuple[int, ...]) -> None:
        self.bits = bits
        self.register_buffer("weight_q", torch.zeros(shape, dtype=P.storage_dtype(bits)))
        self.register_buffer("weight_scale", torch.ones(qparam_shape, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(qparam_shape, dtype=torch.int32))

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.weight_q.copy_(codes)
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zero_point)

    def check_loaded(self) -> None:
        """Reject codes outside the bit width's range and scales that are not finite and > 0."""
        from nnopt.errors import ModelFormatError

        qmin, qmax = P.qrange(self.bits, symmetric=False)  # the widest range either scheme uses
        if self.weight_q.numel() and (int(self.weight_q.min()) < qmin or int(self.weight_q.max()) > qmax):
            raise ModelFormatError(f"{type(self).__name__}: weight codes lie outside the {self.bits}-bit range")
        if not bool((torch.isfinite(self.weight_scale) & (self.weight_scale > 0)).all()):
            raise ModelFormatError(f"{type(self).__name__}: weight scales must be finite and > 0")

    def dequantized_weight(self) -> torch.Tensor:
        return P.dequantize(self.weight_q, self.weight_scale, self.weight_zero_point)


class QuantizedLinear(_QuantizedWeight):
    def __init__(self, source: nn.Linear, bits: int, qparam_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self._init_weight_buffers(source.weight.shape, bits, qparam_shape)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantizedConv2d(_QuantizedWeight):
    def __init__(self, source: nn.Conv2d, bits: int, qparam_shape: tuple[int, ...]) -> None:
        super().__init__()
        if source.padding_mode != "zeros":
            raise ValueError("only zero padding is supported for quantized Conv2d")
        self.in_channels, self.out_channels = source.in_channels, source.out_channels
        self.kernel_size = source.kernel_size
        self.stride, self.padding = source.stride, source.padding
        self.dilation, self.groups = source.dilation, source.groups
        self._init_weight_buffers(source.weight.shape, bits, qparam_shape)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, bits={self.bits}"
        )


QUANTIZED_TYPES: dict[type[nn.Module], type[_QuantizedWeight]] = {
    nn.Linear: QuantizedLinear,
    nn.Conv2d: QuantizedConv2d,
}
