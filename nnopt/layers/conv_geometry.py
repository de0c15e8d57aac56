"""One convolution's geometry (1-D/2-D, plain or transposed, any groups, padding and padding mode), and
the float convolution it computes with a given weight.

nnopt's compressed convolution layers (weight-only, clustered, static int8) store their weight in their
own form and rebuild or multiply it; this object is what they keep of the ``nn.Conv*`` they replaced, so
that every padding mode, dilation, stride and group count runs exactly as in torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import UnsupportedModelError

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
_CONVS = {(1, False): F.conv1d, (2, False): F.conv2d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What a convolution does besides its weight. ``reversed_padding`` is torch's explicit padding
    (last dimension first, left and right), also for ``padding="same"``."""

    dims: int
    transposed: bool
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    output_padding: tuple[int, ...]
    reversed_padding: tuple[int, ...]

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        """The geometry of an ``nn.Conv1d/2d`` or ``nn.ConvTranspose1d/2d`` (or a subclass keeping their fields)."""
        if not isinstance(conv, CONV_TYPES):
            raise UnsupportedModelError(f"{type(conv).__name__} is not a 1-D or 2-D convolution")
        c: Any = conv
        transposed = bool(c.transposed)
        if transposed and c.padding_mode != "zeros":
            raise UnsupportedModelError(f"{type(conv).__name__} supports zero padding only")
        return cls(
            dims=len(c.kernel_size), transposed=transposed, in_channels=int(c.in_channels),
            out_channels=int(c.out_channels), kernel_size=tuple(c.kernel_size), stride=tuple(c.stride),
            padding=c.padding if isinstance(c.padding, str) else tuple(c.padding), dilation=tuple(c.dilation),
            groups=int(c.groups), padding_mode=str(c.padding_mode), output_padding=tuple(c.output_padding),
            reversed_padding=tuple(int(p) for p in c._reversed_padding_repeated_twice),
        )

    def copy_to(self, layer: Any) -> None:
        """Give ``layer`` the attributes of an ``nn.Conv*`` (profile, exporters and repr read them)."""
        for field in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                      "padding_mode", "output_padding", "transposed"):
            setattr(layer, field, getattr(self, field))
        layer.geometry = self

    @property
    def plain(self) -> bool:
        """A forward convolution with numeric zero padding (what ONNX and Keras exporters understand)."""
        return not self.transposed and self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float convolution of ``x`` with ``weight`` (the source's weight shape) and ``bias``."""
        if self.transposed:
            padding: Any = self.padding  # numeric: transposed convolutions take no padding strings
            return _TRANSPOSED[self.dims](x, weight, bias, self.stride, padding, self.output_padding,
                                          self.groups, self.dilation)
        conv = _CONVS[(self.dims, False)]
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def pad_codes(self, codes: torch.Tensor, zero: float) -> torch.Tensor:
        """Pad float-valued activation codes as the source pads its input: zero padding holds ``zero``
        (the code of 0.0); reflect/replicate/circular pad the codes themselves (quantization is elementwise)."""
        if not any(self.reversed_padding):
            return codes
        if self.padding_mode == "zeros":
            return F.pad(codes, self.reversed_padding, value=zero)
        return F.pad(codes, self.reversed_padding, mode=self.padding_mode)

    def run_unpadded(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution of already padded ``x`` (see :meth:`pad_codes`), without bias."""
        return _CONVS[(self.dims, False)](x, weight, None, self.stride, 0, self.dilation, self.groups)

    def run_centered(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` padded as the source pads, without bias."""
        return self.run(x, weight, None)

    def macs(self, weight_shape: torch.Size, output: torch.Tensor) -> int:
        """Multiply-accumulates of one call that returned ``output``."""
        per_weight = 1
        for size in weight_shape[1:]:
            per_weight *= int(size)
        if not self.transposed:
            return output.numel() * per_weight  # (in / groups) · kernel per output element
        # Transposed: every input element meets (out / groups) · kernel weights; the input has about
        # output / stride positions per channel (exact but for the border the padding crops).
        positions = output.numel() // max(self.out_channels, 1)
        for step in self.stride:
            positions //= step
        return positions * self.in_channels * per_weight

    def describe(self) -> str:
        kind = f"ConvTranspose{self.dims}d" if self.transposed else f"Conv{self.dims}d"
        extra = "" if self.groups == 1 else f", groups={self.groups}"
        shape = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        return f"{kind}({shape}, stride={self.stride}{extra})"
