"""Quantization maths as pure functions. Everything else in nnopt builds on these.

Convention (the mission's rule): ``w_q = clamp(round(w · S) + z)`` and ``w ≈ (w_q − z) / S``,
where ``S`` is a multiplier (codes per unit), ``z`` an integer zero point (0 when symmetric).
For in-range weights the rounding error is at most ``1 / (2S)``.

Granularity: one ``(S, z)`` per tensor, per slice along a channel axis (:func:`compute_qparams`),
or per group of consecutive elements along the last dimension (:func:`compute_group_qparams`).
Every variant derives ``(S, z)`` from a range with the one formula in :func:`qparams_from_range`.
"""

from __future__ import annotations

import math

import torch

# Storage primitives accept up to 16 bits (the packed format stores int16 codes); quantization
# configs are limited to 2..8 bits by :func:`check_quant_bits`.
MIN_BITS, MAX_BITS = 2, 16
QUANT_MIN_BITS, QUANT_MAX_BITS = 2, 8

# A range so narrow that ``qmax / span`` overflows float32 would store S = inf (and 0 · inf = NaN);
# capping S keeps scales finite and > 0, and tiny values still round to within 1/(2S) of themselves.
_MAX_SCALE = torch.finfo(torch.float32).max


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def check_quant_bits(bits: int) -> None:
    """Bit widths a quantization config may ask for: 2..8 (wider codes are storage-only)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not QUANT_MIN_BITS <= bits <= QUANT_MAX_BITS:
        raise ValueError(f"bits must be an integer in {QUANT_MIN_BITS}..{QUANT_MAX_BITS}, got {bits!r}")


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
    if not -w.ndim <= channel_axis < w.ndim:  # `%` would silently pick another axis (or divide by 0)
        raise ValueError(f"channel_axis {channel_axis} is out of range for a {w.ndim}-d tensor")
    axis = channel_axis % w.ndim
    return tuple(d for d in range(w.ndim) if d != axis)


def qparams_from_range(
    lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int = 8, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale multiplier ``S`` (float32) and zero point ``z`` (int32) for values in ``[lo, hi]``.

    ``lo``/``hi`` are observed minima/maxima (tensors broadcast together, e.g. one per channel).
    The range is widened to include 0 so that zeros (pruned weights, ReLU outputs) stay exactly
    zero; an empty range (all zeros) gets ``S = 1``. Symmetric uses ``max(|lo|, |hi|)`` and ``z = 0``.
    """
    qmin, qmax = qrange(bits, symmetric)
    # float64 so S is not off by an ulp at the range's ends.
    lo = torch.as_tensor(lo).detach().to(torch.float64)
    hi = torch.as_tensor(hi).detach().to(torch.float64)
    if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
        raise ValueError("quantization range must be finite (the data holds NaN or inf)")
    if bool((lo > hi).any()):
        raise ValueError("quantization range has lo > hi")
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if symmetric:
        max_abs = torch.maximum(-lo, hi)
        scale = torch.where(max_abs > 0, qmax / max_abs, torch.ones_like(max_abs)).clamp(max=_MAX_SCALE)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        span = hi - lo
        scale = torch.where(span > 0, (qmax - qmin) / span, torch.ones_like(span)).clamp(max=_MAX_SCALE)
        # lo ≤ 0 and lo · S ≥ −(qmax − qmin), so z stays inside [qmin, qmax].
        zero = (qmin - torch.round(lo * scale)).to(torch.int32)
    return scale.to(torch.float32), zero


def compute_qparams(
    w: torch.Tensor, bits: int = 8, symmetric: bool = True, channel_axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale multiplier ``S`` and zero point ``z`` from the weights' range (min–max observer).

    Returned tensors broadcast against ``w`` (kept dims). An all-zero slice gets ``S = 1``.
    """
    dims = reduce_dims(w, channel_axis)
    w = w.detach()
    if not dims:  # per channel of a 1-D tensor: nothing to reduce (torch reads dim=() as "every dim")
        return qparams_from_range(w, w, bits, symmetric)
    # min/max are exact in any dtype; qparams_from_range does the arithmetic in float64.
    return qparams_from_range(w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True), bits, symmetric)


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


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0, bits: int = 8,
    symmetric: bool = True,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32: the values a quantized tensor really represents."""
    return dequantize(quantize(x, scale, zero_point, bits, symmetric), scale, zero_point)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σref² / Σ(ref − approx)²)`` in dB (inf when equal)."""
    if reference.shape != approx.shape:
        raise ValueError(f"sqnr_db needs equal shapes, got {tuple(reference.shape)} and {tuple(approx.shape)}")
    ref = reference.detach().to(torch.float64)
    noise = float(((ref - approx.detach().to(torch.float64)) ** 2).sum())
    if noise == 0:
        return math.inf
    signal = float((ref**2).sum())
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


# -- per-group: groups of ``group_size`` consecutive elements along the last dimension, per row --
# When ``group_size`` does not divide the last dimension ``n``, the last group is partial: it holds the
# ``n mod group_size`` remaining elements and has its own (S, z) from their range alone (576 inputs in
# groups of 128: four full groups and one of 64). Scales are (…, ceil(n / group_size), 1).


def group_count(n: int, group_size: int) -> int:
    """Groups per row of ``n`` elements: ``ceil(n / group_size)`` (the last one partial when it does not divide)."""
    return -(-n // group_size)


def _check_group_size(shape: torch.Size, group_size: int) -> int:
    """Number of groups per row (the last one may be partial); names the problem when ``group_size`` is invalid."""
    if len(shape) == 0:
        raise ValueError("per-group quantization needs a tensor with at least one dimension")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    return group_count(shape[-1], group_size)


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` zero-padded along the last dimension to ``size`` (``t`` itself when it already has that size)."""
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]))


def _grouped(t: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``t`` as ``(*t.shape[:-1], n_groups, group_size)``, zero-padded when the last group is partial;
    ``group_size`` defaults to what ``scale`` implies (only where that is unambiguous: full groups)."""
    if group_size is None:
        if scale.ndim < 2 or scale.shape[-2] == 0 or (t.ndim and t.shape[-1] % scale.shape[-2]):
            raise ValueError(f"cannot infer group_size from scale shape {tuple(scale.shape)} for {tuple(t.shape)}"
                             " (pass group_size when the last group is partial)")
        group_size = t.shape[-1] // scale.shape[-2]
    n_groups = _check_group_size(t.shape, group_size)
    return _pad_last(t, n_groups * group_size).reshape(*t.shape[:-1], n_groups, group_size)


def _ungrouped(grouped: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_grouped`: back to ``shape``, dropping the partial group's padding."""
    n_groups, group_size = grouped.shape[-2], grouped.shape[-1]
    flat = grouped.reshape(*shape[:-1], n_groups * group_size)
    return flat if flat.shape[-1] == shape[-1] else flat[..., : shape[-1]]


def compute_group_qparams(
    w: torch.Tensor, bits: int = 8, symmetric: bool = True, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, z)`` per group of ``group_size`` consecutive elements along the last dimension.

    Shapes are ``(*w.shape[:-1], ceil(w.shape[-1] / group_size), 1)``, broadcasting against the grouped
    view ``w.reshape(*w.shape[:-1], -1, group_size)`` (zero-padded when the last group is partial).
    """
    n_groups = _check_group_size(w.shape, group_size)
    # Zero padding leaves the partial group's (S, z) as its own elements give them: every range is widened
    # to include 0 anyway (qparams_from_range). One row per group, so the per-channel path does the work.
    padded = _pad_last(w.detach(), n_groups * group_size)
    scale, zero = compute_qparams(padded.reshape(-1, group_size), bits, symmetric, channel_axis=0)
    shape = (*w.shape[:-1], n_groups, 1)
    return scale.reshape(shape), zero.reshape(shape)


def quantize_grouped(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0, bits: int = 8,
    symmetric: bool = True, group_size: int | None = None,
) -> torch.Tensor:
    """Codes with ``w``'s shape, each group quantized with its own ``(S, z)`` from :func:`compute_group_qparams`."""
    return _ungrouped(quantize(_grouped(w, scale, group_size), scale, zero_point, bits, symmetric), w.shape)


def dequantize_grouped(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0, group_size: int | None = None
) -> torch.Tensor:
    """Float32 values with ``codes``' shape: the inverse of :func:`quantize_grouped`."""
    return _ungrouped(dequantize(_grouped(codes, scale, group_size), scale, zero_point), codes.shape)


# -- int4 storage: two codes per byte --

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
    # Arithmetic shifts on the int8 view sign-extend each nibble: ~8× faster than masking in int16
    # (17 vs 138 ms on 4096×2048 bytes), and the int4 dequantize path runs this on every call.
    signed = packed.view(torch.int8)
    low, high = (signed << 4) >> 4, signed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)
