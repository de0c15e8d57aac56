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


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte along the last dimension (even index in the low nibble).

    ``codes`` holds integers in −8..7 with an even last dimension; returns uint8 of half that size.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("int4 codes must lie in -8..7")
    nibbles = codes.to(torch.int16) & 0xF  # two's complement low nibble
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes in −8..7, last dimension doubled."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 data must be uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    low, high = p & 0xF, (p >> 4) & 0xF
    both = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)
