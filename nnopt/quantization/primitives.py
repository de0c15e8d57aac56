"""Quantization maths as pure functions. Everything else in nnopt builds on these.

Convention (the mission's rule): ``w_q = clamp(round(w · S) + z)`` and ``w ≈ (w_q − z) / S``,
where ``S`` is a multiplier (codes per unit), ``z`` an integer zero point (0 when symmetric).
For in-range weights the rounding error is at most ``1 / (2S)``.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer code range: symmetric drops −2^(b−1) so that the range is balanced around 0."""
    check_bits(bits)
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def storage_dtype(bits: int) -> torch.dtype:
    """The narrowest integer dtype that holds ``bits``-bit codes (packing below 8 bits is separate)."""
    check_bits(bits)
    return torch.int8 if bits <= 8 else torch.int16


def reduce_dims(w: torch.Tensor, channel_axis: int | None) -> tuple[int, ...]:
    """Dimensions reduced over for one scale per tensor (None) or per slice along ``channel_axis``."""
    if channel_axis is None:
        return tuple(range(w.ndim))
    axis = channel_axis % w.ndim
    return tuple(d for d in range(w.ndim) if d != axis)


def compute_qparams(
    w: torch.Tensor, bits: int = 8, symmetric: bool = True, channel_axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale multiplier ``S`` and zero point ``z`` from the weights' range (min–max observer).

    Returned tensors broadcast against ``w`` (kept dims). An all-zero slice gets ``S = 1``.
    """
    qmin, qmax = qrange(bits, symmetric)
    dims = reduce_dims(w, channel_axis)
    w = w.detach().to(torch.float64)  # float64 so S is not off by an ulp at the range's ends
    if symmetric:
        max_abs = w.abs().amax(dim=dims, keepdim=True)
        scale = torch.where(max_abs > 0, qmax / max_abs, torch.ones_like(max_abs))
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        # The range always includes 0 so that zeros (pruned weights) stay exactly zero.
        lo = w.amin(dim=dims, keepdim=True).clamp(max=0)
        hi = w.amax(dim=dims, keepdim=True).clamp(min=0)
        span = hi - lo
        scale = torch.where(span > 0, (qmax - qmin) / span, torch.ones_like(span))
        zero = (qmin - torch.round(lo * scale)).to(torch.int32)
    return scale.to(torch.float32), zero


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0, bits: int = 8,
    symmetric: bool = True,
) -> torch.Tensor:
    """Integer codes ``clamp(round(w · S) + z)`` in the storage dtype for ``bits``."""
    qmin, qmax = qrange(bits, symmetric)
    codes = torch.round(w.to(torch.float64) * scale.to(torch.float64)) + torch.as_tensor(zero_point)
    return codes.clamp(qmin, qmax).to(storage_dtype(bits))


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0
) -> torch.Tensor:
    """Float weights ``(w_q − z) / S`` in float32."""
    return (codes.to(torch.float32) - torch.as_tensor(zero_point, dtype=torch.float32)) / scale
