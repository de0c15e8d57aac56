"""Layers that store integer weight codes plus scales (weight-only quantization).

Two storage layouts:

- **codes**: ``weight_q`` int8 codes in the weight's shape, ``weight_scale`` S and ``weight_zero_point`` z
  (any bit width 2..8, symmetric or not).
- **packed int4**: ``weight_packed`` uint8, two signed 4-bit codes per byte along the flattened input
  dimension (:func:`~nnopt.quantization.primitives.pack_int4`), shape ``(out, in·kh·kw / 2)``, plus
  ``weight_scale``. Used for symmetric codes of at most 4 bits whose flattened input dimension is even
  (an odd one falls back to the codes layout); symmetric means z = 0, so no zero point is stored.

Scales are per tensor ``(1, …)``, per output channel ``(out, 1, …)``, or per group of ``group_size``
consecutive elements of the flattened input dimension, ``(out, in·kh·kw / group_size)``.

Compute. ``dequantize`` rebuilds the fp32 weight on every call (``(w_q − z) / S``) and runs F.linear /
F.conv2d: exact and general, but slow for large layers. For Linear on CPU, ``compute="auto"`` uses
torch's weight-only kernels where they support the shape, with bf16 activations (their fp32-activation
paths were 3–50× slower than dequantizing here) and fp32 accumulation:

- ``torch._weight_int4pack_mm_for_cpu``: codes of ≤ 4 bits, out % 16 == 0, groups of 32/64/128/256
  (per-channel / per-tensor scales are repeated into such groups; asymmetric zero points fold into the
  kernel's per-group offset);
- ``torch._weight_int8pack_mm``: otherwise, symmetric codes with per-channel or per-tensor scales and
  in % 16 == 0 (other in-sizes gave wrong results or crashed in torch 2.13, so they are never passed).

Everything else (Conv2d, grouped int5..8, autograd through the input, non-CPU tensors) dequantizes.
The kernels' bf16 rounding adds ≈3e-3 relative error (norm) to the outputs, well inside the quantization
error itself (≈9e-3 for per-channel int8, ≈1e-1 for int4 G=32 on Gaussian weights).

Measured here, 4096×4096 Linear, torch 2.13 CPU, 2 threads, median ms over interleaved rounds (the
machine was shared with other jobs, so absolute numbers are noisy; the ordering was stable):

=====================================  ========  =========
path                                    batch 1   batch 32
=====================================  ========  =========
fp32 F.linear (cached fp32 weight)         12.0       25.4
dequantize int8 + F.linear (fallback)     213        252
dequantize int4 G=32 + F.linear           553        577
_weight_int8pack_mm, fp32 activations      36.0     1488
_weight_int8pack_mm, bf16 activations      12.0       40.0
_weight_int4pack_mm (G=32), fp32 act.      86.7     2433
_weight_int4pack_mm (G=32), bf16 act.      12.0       10.5
=====================================  ========  =========
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.quantization import primitives as P

COMPUTE_MODES = ("auto", "dequantize")
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, widest first

Kernel = Callable[[torch.Tensor], torch.Tensor]  # (rows, in) bf16 -> (rows, out) bf16


class _QuantizedWeight(nn.Module):
    """Integer weight codes (``weight_q`` or ``weight_packed``) plus ``weight_scale`` (and ``weight_zero_point``)."""

    weight_scale: torch.Tensor

    def _init_weight_buffers(
        self, shape: torch.Size, bits: int, qparam_shape: tuple[int, ...], group_size: int | None = None,
        packed: bool = False, compute: str = "auto",
    ) -> None:
        shape = torch.Size(shape)
        flat_in = shape[1:].numel()
        if group_size is not None and (group_size < 1 or flat_in % group_size):
            raise ValueError(f"group size {group_size} does not divide the input dimension {flat_in}")
        if packed and (bits > 4 or flat_in % 2):
            raise ValueError(f"packed int4 storage needs ≤ 4 bits and an even input dimension, got {bits}, {flat_in}")
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_MODES)}, got {compute!r}")
        self.bits, self.group_size, self.packed, self.compute = bits, group_size, packed, compute
        self.weight_shape = shape
        if packed:
            self.register_buffer("weight_packed", torch.zeros(shape[0], flat_in // 2, dtype=torch.uint8))
        else:
            self.register_buffer("weight_q", torch.zeros(shape, dtype=P.storage_dtype(bits)))
        self.register_buffer("weight_scale", torch.ones(qparam_shape, dtype=torch.float32))
        if not packed:
            self.register_buffer("weight_zero_point", torch.zeros(qparam_shape, dtype=torch.int32))
        # (source tensors, their versions) -> kernel; rebuilt when load_state_dict/set_codes change them.
        self._kernel_cache: tuple[tuple[tuple[torch.Tensor, int], ...], Kernel | None] | None = None

    @property
    def weight_storage(self) -> str:
        """How the codes are stored, for profiles: ``"int8"`` or ``"int4 (packed)"``."""
        return "int4 (packed)" if self.packed else str(self.weight_q.dtype).removeprefix("torch.")

    def _sources(self) -> tuple[torch.Tensor, ...]:
        if self.packed:
            return self.weight_packed, self.weight_scale
        return self.weight_q, self.weight_scale, self.weight_zero_point

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store codes (in the weight's shape) and their scales / zero points."""
        if self.packed:
            if bool(zero_point.ne(0).any()):
                raise ValueError("packed int4 storage holds symmetric codes only (zero point 0)")
            self.weight_packed.copy_(P.pack_int4(codes.reshape(self.weight_shape[0], -1)))
        else:
            self.weight_q.copy_(codes)
            self.weight_zero_point.copy_(zero_point)
        self.weight_scale.copy_(scale)
        self._kernel_cache = None

    def check_loaded(self) -> None:
        """Reject codes outside the bit width's range and scales that are not finite and > 0."""
        from nnopt.errors import ModelFormatError

        # Packed codes are symmetric by construction; the codes layout may hold either scheme.
        qmin, qmax = P.qrange(self.bits, symmetric=self.packed)
        codes = self.weight_codes()
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise ModelFormatError(f"{type(self).__name__}: weight codes lie outside the {self.bits}-bit range")
        if not bool((torch.isfinite(self.weight_scale) & (self.weight_scale > 0)).all()):
            raise ModelFormatError(f"{type(self).__name__}: weight scales must be finite and > 0")
        self._kernel_cache = None

    def weight_codes(self) -> torch.Tensor:
        """Integer codes in the weight's shape (``weight_q`` itself, or unpacked from ``weight_packed``)."""
        if self.packed:
            return P.unpack_int4(self.weight_packed).reshape(self.weight_shape)
        return self.weight_q

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight the codes stand for: ``(w_q − z) / S``, per tensor, channel or group."""
        codes = self.weight_codes()
        zero = 0 if self.packed else self.weight_zero_point
        if self.group_size is None:
            return P.dequantize(codes, self.weight_scale, zero)
        groups = self.weight_scale.shape[1]
        if not self.packed:
            zero = self.weight_zero_point.unsqueeze(-1)
        grouped = codes.reshape(self.weight_shape[0], groups, self.group_size)
        return P.dequantize(grouped, self.weight_scale.unsqueeze(-1), zero).reshape(self.weight_shape)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._kernel_cache = None
        super()._load_from_state_dict(*args, **kwargs)


class QuantizedLinear(_QuantizedWeight):
    def __init__(
        self, source: nn.Linear, bits: int, qparam_shape: tuple[int, ...], *, group_size: int | None = None,
        packed: bool = False, compute: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self._init_weight_buffers(source.weight.shape, bits, qparam_shape, group_size, packed, compute)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel_for(x)
        if kernel is None:
            return F.linear(x, self.dequantized_weight(), self.bias)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = kernel(rows).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @property
    def kernel_name(self) -> str:
        """Which compute path a float32 CPU input takes: ``"int4pack_mm"``, ``"int8pack_mm"`` or ``"dequantize"``."""
        if self.compute != "auto":
            return "dequantize"
        kernel = self._kernel()
        return "dequantize" if kernel is None else getattr(kernel, "kernel_name", "kernel")

    def _kernel_for(self, x: torch.Tensor) -> Kernel | None:
        if (
            self.compute != "auto"
            or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.bfloat16)
            or (x.requires_grad and torch.is_grad_enabled())  # the kernels have no backward
        ):
            return None
        return self._kernel()

    def _kernel(self) -> Kernel | None:
        sources = self._sources()
        cached = self._kernel_cache
        if cached is not None and all(
            t is s and v == _version(s) for (t, v), s in zip(cached[0], sources, strict=True)
        ):
            return cached[1]
        # Built as ordinary tensors even when called under inference_mode, so later autograd-mode calls may use it.
        with torch.inference_mode(False), torch.no_grad():
            kernel = self._build_kernel() if sources[0].device.type == "cpu" else None
        self._kernel_cache = (tuple((s, _version(s)) for s in sources), kernel)
        return kernel

    def _build_kernel(self) -> Kernel | None:
        out_f, in_f = self.out_features, self.in_features
        zero = torch.zeros(()) if self.packed else self.weight_zero_point
        if self.group_size is None:  # one scale per row (or tensor): expand to (out, 1)
            scale = self.weight_scale.reshape(-1, 1).expand(out_f, 1)
            zero = zero.reshape(-1, 1).expand(out_f, 1)
        else:
            scale = self.weight_scale
            zero = zero.expand_as(scale) if self.packed else zero
        group = self.group_size or next((g for g in INT4_KERNEL_GROUPS if in_f % g == 0), None)
        if self.bits <= 4 and out_f % 16 == 0 and group in INT4_KERNEL_GROUPS and in_f % group == 0:
            codes = self.weight_codes().to(torch.int32) + 8  # the kernel's unsigned nibbles, 0..15
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # Kernel: w = (q − 8) · step + offset per (group, row); ours: w = (c − z) / S with c = q − 8.
            repeat = 1 if self.group_size else in_f // group  # a row's one scale, once per kernel group
            step = (1.0 / scale.double()).repeat_interleave(repeat, dim=1)
            offset = -zero.double().repeat_interleave(repeat, dim=1) * step
            scale_and_zero = torch.stack((step.t(), offset.t()), dim=-1).to(torch.bfloat16).contiguous()

            def int4_kernel(rows: torch.Tensor) -> torch.Tensor:
                return torch._weight_int4pack_mm_for_cpu(rows, weight, group, scale_and_zero)

            int4_kernel.kernel_name = "int4pack_mm"  # type: ignore[attr-defined]
            return int4_kernel
        if self.group_size is None and in_f % 16 == 0 and not bool(zero.ne(0).any()):
            codes8 = self.weight_codes().contiguous()
            row_step = (1.0 / scale.double()).reshape(out_f).to(torch.bfloat16)

            def int8_kernel(rows: torch.Tensor) -> torch.Tensor:
                return torch._weight_int8pack_mm(rows, codes8, row_step)

            int8_kernel.kernel_name = "int8pack_mm"  # type: ignore[attr-defined]
            return int8_kernel
        return None

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def _version(t: torch.Tensor) -> int:
    # Inference tensors keep no version counter; set_codes/load_state_dict still reset the cache.
    return -1 if t.is_inference() else t._version


class QuantizedConv2d(_QuantizedWeight):
    def __init__(
        self, source: nn.Conv2d, bits: int, qparam_shape: tuple[int, ...], *, group_size: int | None = None,
        packed: bool = False, compute: str = "auto",
    ) -> None:
        super().__init__()
        if source.padding_mode != "zeros":
            raise ValueError("only zero padding is supported for quantized Conv2d")
        self.in_channels, self.out_channels = source.in_channels, source.out_channels
        self.kernel_size = source.kernel_size
        self.stride, self.padding = source.stride, source.padding
        self.dilation, self.groups = source.dilation, source.groups
        self._init_weight_buffers(source.weight.shape, bits, qparam_shape, group_size, packed, compute)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No weight-only conv kernel exists in torch for CPU: always dequantize.
        return F.conv2d(
            x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, bits={self.bits}{group}"
        )


QUANTIZED_TYPES: dict[type[nn.Module], type[_QuantizedWeight]] = {
    nn.Linear: QuantizedLinear,
    nn.Conv2d: QuantizedConv2d,
}
