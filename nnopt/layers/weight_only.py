"""Layers that store integer weight codes plus scales (weight-only quantization).

Two storage layouts:

- **codes**: ``weight_q`` int8 codes in the weight's shape, ``weight_scale`` S and ``weight_zero_point`` z
  (any bit width 2..8, symmetric or not).
- **packed int4**: ``weight_packed`` uint8, two signed 4-bit codes per byte along the flattened input
  dimension (:func:`~nnopt.layers.primitives.pack_int4`), shape ``(out, in·kh·kw / 2)``, plus
  ``weight_scale``. Used for symmetric codes of at most 4 bits whose flattened input dimension is even
  (an odd one falls back to the codes layout); symmetric means z = 0, so no zero point is stored.

Scales are per tensor ``(1, …)``, per output channel ``(out, 1, …)``, or per group of ``group_size``
consecutive elements of the flattened input dimension, ``(out, ceil(in·kh·kw / group_size))``; when
``group_size`` does not divide the input dimension the last group is partial, with its own scale.

Compute (``compute=``). ``"dequantize"`` rebuilds the fp32 weight on every call (``(w_q − z) / S``) and
runs F.linear / F.conv2d: exact and general, but slow for large layers. For Linear on CPU, torch's
weight-only kernels run with bf16 activations (their fp32-activation paths were 8–90× slower than fp32
here) and fp32 accumulation:

- ``torch._weight_int4pack_mm_for_cpu``: codes of ≤ 4 bits, out % 16 == 0, groups of 32/64/128/256
  (per-channel / per-tensor scales are repeated into such groups; so are the scales of groups with a
  partial last one, into the widest kernel group dividing both the group and in, e.g. 64s for 128s on
  576 inputs; asymmetric zero points fold into the kernel's per-group offset);
- ``torch._weight_int8pack_mm``: otherwise, symmetric codes with per-channel or per-tensor scales and
  in % 16 == 0 (other in-sizes gave wrong results or crashed in torch 2.13, so they are never passed).

``"kernel"`` uses them wherever they support the shape (no fp32 weight is ever materialized). ``"auto"``
(the default) does too, except the int8 kernel for layers under 131072 weights (e.g. 256×256), where
dequantizing measured faster at every batch size. The choice depends on the layer only, never on the
batch, so a row's output does not change with the batch it is in. Everything else (Conv2d, grouped
int5..8, autograd through the input, non-CPU tensors) dequantizes. The kernels' bf16 rounding adds ≈3e-3
relative error (norm) to the outputs, inside the quantization error itself (≈9e-3 for per-channel int8,
≈1e-1 for int4 G=32 on Gaussian weights).

Measured, 4096×4096 Linear, torch 2.13 CPU (AVX-512 Xeon), 2 threads, median ms via
``nnopt.metrics.speed.compare_latency`` (paths interleaved):

=====================================  ========  =========
path                                    batch 1   batch 32
=====================================  ========  =========
fp32 F.linear (cached fp32 weight)         1.41       7.03
dequantize int8 + F.linear                75.3       68.4
dequantize int4 G=32 + F.linear           88.1       78.9
_weight_int8pack_mm, fp32 activations     10.9      313
_weight_int4pack_mm G=32, fp32 act.       21.7      613
_weight_int8pack_mm, bf16 activations      0.66       8.94
_weight_int4pack_mm G=32, bf16 act.        0.65       8.76
_weight_int4pack_mm G=128, bf16 act.       0.60       8.45
=====================================  ========  =========

Partial last groups (576 inputs, groups of 128), measured side by side on an AVX2 AMD EPYC, 1 thread,
576→1536, median ms at batch 1 / 16: kernel on 64-wide sub-groups 0.150 / 0.707 (the same as groups of
64 that divide: 0.151 / 0.698); zero-padding weight and input to 640 instead 0.177 / 0.789 (same
outputs); dequantize 1.79 / 2.17; fp32 F.linear 0.085 / 0.457 (a 3.5 MB weight sits in cache there).

The kernels win in the memory-bound regime. Past a crossover, dequantizing once per call and running
the fp32 GEMM is faster (same machine): int8 from ≈16–32 rows for 1024², ≈256–512 for 4096² (at 512
rows: 194 vs 154 ms), never for 64² or 256²; int4 from ≈128–256 rows for 256²–4096², ≈512 for 64².
Throughput-bound callers with large batches can pass ``compute="dequantize"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import UnsupportedModelError
from nnopt.layers import primitives as P
from nnopt.layers.conv_geometry import ConvGeometry
from nnopt.layers.kernels import tensor_version
from nnopt.layers.protocol import KernelCost, conv_repr, linear_macs, own_bytes

COMPUTE_MODES = ("auto", "kernel", "dequantize")
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, widest first

# compute="auto" leaves smaller layers to the dequantize path: measured faster for them at every batch size.
INT8_KERNEL_MIN_WEIGHTS = 131072


@dataclasses.dataclass(frozen=True)
class _Kernel:
    name: str
    run: Callable[[torch.Tensor], torch.Tensor]  # (rows, in) bf16 -> (rows, out) bf16


class _KernelCache:
    """Kernel-format weights built from the buffers. Copies and pickles start empty: the kernel closes
    over the original module's tensors, so a copy must build its own."""

    def __init__(self) -> None:
        self.key: tuple[str, tuple[tuple[torch.Tensor, int], ...]] | None = None
        self.kernel: _Kernel | None = None

    def clear(self) -> None:
        self.key, self.kernel = None, None

    def __deepcopy__(self, memo: dict[int, Any]) -> _KernelCache:
        return _KernelCache()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_KernelCache, ())


class _QuantizedWeight(nn.Module):
    """Integer weight codes (``weight_q`` or ``weight_packed``) plus ``weight_scale`` (and ``weight_zero_point``)."""

    weight_scale: torch.Tensor

    def _init_weight_buffers(
        self, shape: torch.Size, bits: int, qparam_shape: tuple[int, ...], group_size: int | None = None,
        packed: bool = False, compute: str = "auto",
    ) -> None:
        shape = torch.Size(shape)
        flat_in = shape[1:].numel()
        if group_size is not None and not 1 <= group_size <= max(flat_in, 1):
            raise ValueError(f"group size {group_size} must lie in 1..{flat_in} (the input dimension)")
        if packed and (bits > 4 or flat_in % 2):
            raise ValueError(f"packed int4 storage needs ≤ 4 bits and an even input dimension, got {bits}, {flat_in}")
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_MODES)}, got {compute!r}")
        self.bits, self.group_size, self.packed, self.compute = bits, group_size, packed, compute
        self.weight_shape = shape
        if packed:
            self.register_buffer("weight_packed", torch.zeros(shape[0], flat_in // 2, dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.ones(qparam_shape, dtype=torch.float32))
        else:
            self.register_buffer("weight_q", torch.zeros(shape, dtype=P.storage_dtype(bits)))
            self.register_buffer("weight_scale", torch.ones(qparam_shape, dtype=torch.float32))
            self.register_buffer("weight_zero_point", torch.zeros(qparam_shape, dtype=torch.int32))
        # Keyed by (source tensors, their versions): rebuilt when load_state_dict/set_codes/.to() change them.
        self._kernel_cache = _KernelCache()

    @property
    def weight_storage(self) -> str:
        """How the codes are stored, for profiles: ``"int8"`` or ``"int4 (packed)"``."""
        return "int4 (packed)" if self.packed else str(self.weight_q.dtype).removeprefix("torch.")

    def stored_codes(self) -> dict[str, int]:
        # packed int4 codes are already two per byte
        return {} if self.packed else {"weight_q": self.bits}

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        """The codes are dequantized per call (``w = (q − z) / S``), or read by an int8/int4 kernel."""
        path = getattr(self, "compute_path", "dequantize")
        weights = self.weight_shape.numel()
        extra = (("multiply", "fp32", weights), ("add", "fp32", weights))
        dtype = "fp32" if path == "dequantize" else "bf16"  # int8pack/int4pack kernels take bf16 activations
        return KernelCost(f"weight-only {self.weight_storage}, {path}", dtype, self.macs(output), own_bytes(self),
                          extra)

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
        self._kernel_cache.clear()

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
        self._kernel_cache.clear()

    def weight_codes(self) -> torch.Tensor:
        """Integer codes in the weight's shape (``weight_q`` itself, or unpacked from ``weight_packed``)."""
        if self.packed:
            return P.unpack_int4(self.weight_packed).reshape(self.weight_shape)
        return self.weight_q

    def dense_weight(self) -> torch.Tensor:
        """The fp32 weight the codes stand for: ``(w_q − z) / S``, per tensor, channel or group."""
        codes = self.weight_codes()
        zero = 0 if self.packed else self.weight_zero_point
        if self.group_size is None:
            return P.dequantize(codes, self.weight_scale, zero)
        # Each (out, groups) scale and zero point covers group_size consecutive codes of its row.
        zero = zero if self.packed else zero.unsqueeze(-1)
        rows = codes.reshape(self.weight_shape[0], -1)
        return P.dequantize_grouped(rows, self.weight_scale.unsqueeze(-1), zero, self.group_size).reshape(
            self.weight_shape)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._kernel_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)


class QuantizedLinear(_QuantizedWeight):
    keras_layer = "Dense"

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
            return F.linear(x, self.dense_weight(), self.bias)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = kernel.run(rows).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self.in_features, output)

    @property
    def compute_path(self) -> str:
        """The path a float32 CPU input takes: ``"int4pack_mm"``, ``"int8pack_mm"`` or ``"dequantize"``."""
        kernel = self._kernel() if self.compute != "dequantize" else None
        return "dequantize" if kernel is None else kernel.name

    def _kernel_for(self, x: torch.Tensor) -> _Kernel | None:
        if (
            self.compute == "dequantize"
            or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.bfloat16)
            or (x.requires_grad and torch.is_grad_enabled())  # the kernels have no backward
        ):
            return None
        return self._kernel()

    def _kernel(self) -> _Kernel | None:
        sources, cache = self._sources(), self._kernel_cache
        if cache.key is not None and cache.key[0] == self.compute and all(
            t is s and v == tensor_version(s) for (t, v), s in zip(cache.key[1], sources, strict=True)
        ):
            return cache.kernel
        # Built as ordinary tensors even when called under inference_mode, so later autograd-mode calls may use it.
        with torch.inference_mode(False), torch.no_grad():
            cache.kernel = self._build_kernel() if sources[0].device.type == "cpu" else None
        cache.key = (self.compute, tuple((s, tensor_version(s)) for s in sources))
        return cache.kernel

    def _build_kernel(self) -> _Kernel | None:
        out_f, in_f = self.out_features, self.in_features
        zero = torch.zeros(()) if self.packed else self.weight_zero_point
        if self.group_size is None:  # one scale per row (or tensor): expand to (out, 1)
            scale = self.weight_scale.reshape(-1, 1).expand(out_f, 1)
            zero = zero.reshape(-1, 1).expand(out_f, 1)
        else:
            scale = self.weight_scale
            zero = zero.expand_as(scale) if self.packed else zero
        group = _int4_kernel_group(in_f, self.group_size)
        if self.bits <= 4 and out_f % 16 == 0 and group is not None:
            codes = self.weight_codes().to(torch.int32) + 8  # the kernel's unsigned nibbles, 0..15
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # Kernel: w = (q − 8) · step + offset per (group, row); ours: w = (c − z) / S with c = q − 8.
            # Each kernel group of `group` inputs lies inside one of ours: a row's one scale, or the group's
            # (several kernel groups per group of ours when the last one is partial, e.g. 64s for 128s on 576).
            ours = in_f if self.group_size is None else self.group_size
            index = torch.arange(in_f // group) * group // ours
            step = (1.0 / scale.double())[:, index]
            offset = -zero.double()[:, index] * step
            scale_and_zero = torch.stack((step.t(), offset.t()), dim=-1).to(torch.bfloat16).contiguous()

            def int4(rows: torch.Tensor) -> torch.Tensor:
                return torch._weight_int4pack_mm_for_cpu(rows, weight, group, scale_and_zero)

            return _Kernel("int4pack_mm", int4)
        if self.compute == "auto" and out_f * in_f < INT8_KERNEL_MIN_WEIGHTS:
            return None
        if self.group_size is None and in_f % 16 == 0 and not bool(zero.ne(0).any()):
            codes8 = self.weight_codes().contiguous()
            row_step = (1.0 / scale.double()).reshape(out_f).to(torch.bfloat16)

            def int8(rows: torch.Tensor) -> torch.Tensor:
                return torch._weight_int8pack_mm(rows, codes8, row_step)

            return _Kernel("int8pack_mm", int8)
        return None

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def _int4_kernel_group(in_f: int, group_size: int | None) -> int | None:
    """The group size ``_weight_int4pack_mm_for_cpu`` runs with for these scales, or None where it cannot.

    Per-row scales: the widest kernel group dividing ``in_f``. Groups that divide ``in_f``: the group
    itself, if the kernel accepts it. A partial last group (``group_size`` does not divide ``in_f``): the
    widest kernel group dividing both, each carrying its group's scale (exact: same weights, same sums).
    """
    if group_size is None:
        return next((g for g in INT4_KERNEL_GROUPS if in_f % g == 0), None)
    if in_f % group_size == 0:
        return group_size if group_size in INT4_KERNEL_GROUPS else None
    return next((g for g in INT4_KERNEL_GROUPS if group_size % g == 0 and in_f % g == 0), None)


class QuantizedConv(_QuantizedWeight):
    """A convolution (1-D/2-D, plain or transposed, any groups, padding mode) whose weight is stored as codes.

    No weight-only convolution kernel exists in torch for CPU: every call dequantizes, then runs the
    source's float convolution (:class:`~nnopt.layers.conv_geometry.ConvGeometry`). A transposed
    convolution's weight is (in, out / groups, *kernel), so its "per channel" scales run over input channels.
    """

    keras_layer: str | None = None

    def __init__(
        self, source: nn.Module, bits: int, qparam_shape: tuple[int, ...], *, group_size: int | None = None,
        packed: bool = False, compute: str = "auto",
    ) -> None:
        super().__init__()
        try:
            geometry = ConvGeometry.of(source)
        except UnsupportedModelError as exc:
            raise ValueError(str(exc)) from None
        geometry.copy_to(self)
        weight: torch.Tensor = source.weight  # type: ignore[assignment]
        self._init_weight_buffers(weight.shape, bits, qparam_shape, group_size, packed, compute)
        bias: torch.Tensor | None = source.bias  # type: ignore[assignment]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def macs(self, output: torch.Tensor) -> int:
        return self.geometry.macs(self.weight_shape, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.geometry.run(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        groups = "" if self.groups == 1 else f", groups={self.groups}"
        return conv_repr(self, f"{groups}, bits={self.bits}{group}")


class QuantizedConv2d(QuantizedConv):
    keras_layer = "Conv2D"  # the Keras exporter itself refuses groups, dilation and padding modes it lacks


class QuantizedConv1d(QuantizedConv):
    pass


class QuantizedConvTranspose1d(QuantizedConv):
    pass


class QuantizedConvTranspose2d(QuantizedConv):
    pass


class QuantizedEmbedding(_QuantizedWeight):
    """An Embedding table as codes; a lookup dequantizes only the rows it reads (per-tensor, per-row
    (``per_channel``) or per-group scales along the embedding dimension)."""

    keras_layer = None
    reads_indices = True  # its input is integer ids (profiles and energy probes feed it zeros of int64)
    weight_q: torch.Tensor
    weight_packed: torch.Tensor
    weight_zero_point: torch.Tensor

    def __init__(
        self, source: nn.Embedding, bits: int, qparam_shape: tuple[int, ...], *, group_size: int | None = None,
        packed: bool = False, compute: str = "auto",
    ) -> None:
        super().__init__()
        if source.max_norm is not None or source.sparse:
            raise ValueError("quantized Embedding supports tables without max_norm and sparse gradients")
        self.num_embeddings, self.embedding_dim = source.num_embeddings, source.embedding_dim
        self.padding_idx = source.padding_idx
        self._init_weight_buffers(source.weight.shape, bits, qparam_shape, group_size, packed, compute)
        self.bias = None

    def macs(self, output: torch.Tensor) -> int:
        return 0  # a lookup

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        """A lookup reads the gathered rows' codes and scales, then dequantizes each value."""
        elements = output.numel()
        code_bytes = elements // 2 if self.packed else elements * self.weight_q.element_size()
        return KernelCost(f"lookup, weight-only {self.weight_storage}", "fp32", 0, code_bytes,
                          (("multiply", "fp32", elements), ("add", "fp32", elements)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        if self.packed:
            codes = P.unpack_int4(self.weight_packed.index_select(0, rows))  # (rows, dim)
            zero: torch.Tensor | int = 0
        else:
            codes = self.weight_q.index_select(0, rows)
            zero = self._rows(self.weight_zero_point, rows)
        scale = self._rows(self.weight_scale, rows)
        if self.group_size is None:
            values = P.dequantize(codes, scale, zero)
        else:
            zero_g = zero if isinstance(zero, int) else zero.unsqueeze(-1)
            values = P.dequantize_grouped(codes, scale.unsqueeze(-1), zero_g, self.group_size)
        return values.reshape(*ids.shape, self.embedding_dim)

    @staticmethod
    def _rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The per-row (or per-group) parameters of the rows read; a per-tensor one as is."""
        return table if table.shape[0] == 1 else table.index_select(0, rows)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}"


class QuantizedMatrix(_QuantizedWeight):
    """One weight matrix of a layer that holds several (an LSTM's ``weight_ih_l0``, attention's
    ``in_proj_weight``), stored as codes. Not called itself: its owner computes with :meth:`dense_weight`."""

    keras_layer = None

    def __init__(
        self, source: torch.Tensor, bits: int, qparam_shape: tuple[int, ...], *, group_size: int | None = None,
        packed: bool = False, compute: str = "auto",
    ) -> None:
        super().__init__()
        self._init_weight_buffers(source.shape, bits, qparam_shape, group_size, packed, "dequantize")

    def macs(self, output: torch.Tensor) -> int:
        return 0  # the owner's call does the arithmetic

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"{tuple(self.weight_shape)}, bits={self.bits}{group}"


QUANTIZED_TYPES: dict[type[nn.Module], type[_QuantizedWeight]] = {
    nn.Linear: QuantizedLinear,
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.ConvTranspose1d: QuantizedConvTranspose1d,
    nn.ConvTranspose2d: QuantizedConvTranspose2d,
    nn.Embedding: QuantizedEmbedding,
}
