"""int8 layers: weights as symmetric per-channel int8 codes, computed with a real int8 GEMM.

- :class:`Int8DynamicLinear` quantizes its input per call (per tensor, asymmetric);
- :class:`Int8StaticLinear` / :class:`Int8StaticConv2d` use a calibrated input scale and zero point;
- :class:`Int8Embedding` stores a table as int8 rows.

The GEMM is oneDNN's, ``torch._int_mm`` or an exact float32 product, whichever passed its
known-answer check on this CPU (:mod:`nnopt.layers.kernels`). The passes that create these layers
live in :mod:`nnopt.quantization.ptq`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.layers import kernels as K
from nnopt.layers import primitives as P
from nnopt.layers.conv_geometry import ConvGeometry
from nnopt.layers.protocol import KernelCost, conv_macs, conv_repr, float_dtype_name, linear_macs, own_bytes


class _Int8Weight(nn.Module):
    """int8 weight codes ``weight_q`` (out, …) with per-channel multipliers ``weight_scale`` (out,)."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor

    def _init_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.register_buffer("weight_q", torch.zeros(weight.shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(weight.shape[0], dtype=torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Derived per-channel constants, kept out of the state dict and refreshed whenever the codes
        # change: recomputing Σ_k W_q per call would cost as much as the GEMM itself at batch 1.
        self.register_buffer("weight_step", torch.ones(weight.shape[0]), persistent=False)
        self.register_buffer("weight_colsum", torch.zeros(weight.shape[0], dtype=torch.int32), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    def refresh(self) -> None:
        """Recompute the derived constants from ``weight_q`` and ``weight_scale``."""
        self.weight_step = 1.0 / self.weight_scale  # (out,) the real value of one weight code
        self.weight_colsum = self.weight_q.flatten(1).sum(dim=1, dtype=torch.int32)
        self._codes_fp32: tuple[tuple[int, int, str], torch.Tensor] | None = None

    def gemm_codes_fp32(self) -> torch.Tensor | None:
        """The (out, in) codes as float32 where the exact float32 fallback multiplies them (no int8 kernel
        passed its known-answer check here), kept so that no call converts the weights again: fp32 memory
        for fp32 speed. None wherever an int8 kernel runs."""
        if K.int8_gemm_path(dynamic=False, device=self.weight_q.device.type) != "fp32-exact":
            return None
        codes = self.weight_q
        # keyed by the codes' storage, version and device: an in-place change or a swapped tensor rebuilds it
        key = (codes.data_ptr(), K.tensor_version(codes), str(codes.device))
        cached = getattr(self, "_codes_fp32", None)
        if cached is None or cached[0] != key:
            cached = self._codes_fp32 = (key, codes.flatten(1).to(torch.float32))
        return cached[1]

    weight_storage = "int8"
    keras_layer = None  # Keras layers cannot express quantized activations

    def weight_codes(self) -> torch.Tensor:
        return self.weight_q

    def stored_codes(self) -> dict[str, int]:
        return {"weight_q": 8}

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        """An int8 GEMM, or the exact float32 product of the codes where no int8 kernel passed its check."""
        in_elems = sum(t.numel() for t in inputs)
        out_elems = output.numel()
        dynamic = isinstance(self, Int8DynamicLinear)
        # Quantize each input element (scale, round) and requantize each output (scale, offset), in fp32.
        extra: tuple[tuple[str, str, int], ...] = (
            ("multiply", "fp32", in_elems), ("add", "fp32", in_elems),
            ("multiply", "fp32", out_elems), ("add", "fp32", out_elems),
        )
        if dynamic:
            extra += (("add", "fp32", in_elems),)  # the per-call min/max range pass (a compare per element)
        codes = in_elems * 2  # the int8 codes written, then read by the GEMM
        path = K.int8_gemm_path(dynamic, self.weight_q.device.type)
        if path in ("onednn", "torch-int-mm"):
            return KernelCost("int8", "int8", self.macs(output), own_bytes(self), extra, codes)
        # ... reading the float32 copy of the codes the layer keeps for it, 4 bytes per weight
        return KernelCost(f"int8 codes, {path} product", "fp32", self.macs(output),
                          own_bytes(self) + 4 * self.weight_q.numel(), extra, codes)

    def macs(self, output: torch.Tensor) -> int:
        if hasattr(self, "in_features"):
            return linear_macs(self.in_features, output)
        return conv_macs(self.weight_q.shape, output)

    def set_weight(self, weight: torch.Tensor) -> None:
        scale, _ = P.compute_qparams(weight, 8, symmetric=True, channel_axis=0)
        self.weight_q.copy_(P.quantize(weight, scale, 0, 8, symmetric=True))
        self.weight_scale.copy_(scale.flatten())
        self.refresh()

    def dense_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight_q.ndim - 1)
        return self.weight_q.to(torch.float32) * self.weight_step.view(shape)

    def check_loaded(self) -> None:
        if not bool((torch.isfinite(self.weight_scale) & (self.weight_scale > 0)).all()):
            raise ModelFormatError(f"{type(self).__name__}: weight scales must be finite and > 0")
        if self.weight_q.numel() and int(self.weight_q.min()) < -127:
            raise ModelFormatError(f"{type(self).__name__}: symmetric int8 weight codes must lie in -127..127")


class Int8DynamicLinear(_Int8Weight):
    """Linear with int8 weights; each call quantizes its input per tensor and runs an int8 GEMM.

    ``activation`` ("none" or "gelu", exact erf form) is applied to the output; oneDNN fuses it
    into the GEMM's epilogue, as it writes ``output_dtype`` (see
    :mod:`nnopt.quantization.encoder_fusion`). Any float input is read as float32.
    """

    input_smoothing: torch.Tensor

    def __init__(self, source: nn.Linear, smoothing: bool = False, activation: str = "none") -> None:
        super().__init__()
        if activation not in K.ONEDNN_ACTIVATIONS:
            raise ConfigError(f"Int8DynamicLinear activation must be one of {K.ONEDNN_ACTIVATIONS}, got {activation!r}")
        self.in_features, self.out_features = source.in_features, source.out_features
        self._init_weight(source.weight, source.bias)
        if smoothing:  # 1 / s per input channel; a buffer so that it is saved with the codes
            self.register_buffer("input_smoothing", torch.ones(self.in_features))
        self.smoothing = smoothing
        self.activation = activation
        self.output_dtype = torch.float32
        self._onednn = K.OnednnWeightCache()
        self.shared_input: K.SharedInputCodes | None = None  # set by encoder_fusion for query/key/value

    def refresh(self) -> None:
        super().refresh()
        if hasattr(self, "_onednn"):
            self._onednn.clear()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(x Wᵀ + b)``, plus ``residual`` (same shape as the output) when given."""
        if torch.onnx.is_in_onnx_export():
            from nnopt.io.onnx_export import dynamic_int8_linear

            out = dynamic_int8_linear(self, x)
            return out if residual is None else out + residual
        if residual is not None and (residual.dtype != torch.float32 or self.output_dtype != torch.float32):
            return self.forward(x) + residual
        if x.dtype != torch.float32 and x.is_floating_point():
            x = x.float()
        if x.is_cpu and x.dtype == torch.float32 and x.numel() and K.onednn_int8_exact():
            codes, step, zero = self._input_codes(x)
            packed, w_zero = self._onednn.get(self.weight_q)
            flat_residual = None if residual is None else residual.reshape(-1, self.out_features)
            out = K.onednn_int8_linear(
                codes, step, zero, packed, self.weight_step, self.bias, self.activation, w_zero, self.output_dtype,
                flat_residual,
            )
        else:
            if self.smoothing:
                x = x * self.input_smoothing
            flat = x.reshape(-1, self.in_features)  # (tokens, in)
            scale, zero_t = K.dynamic_qparams(flat)
            x_q = K.quantize_activation(flat, scale, zero_t)
            out = K.int8_linear(x_q, scale, zero_t, self.weight_q, self.weight_step, self.weight_colsum, self.bias,
                                self.gemm_codes_fp32())
            if self.activation == "gelu":
                out = torch.nn.functional.gelu(out)
            out = out.to(self.output_dtype)
            if residual is not None:
                out = out + residual.reshape(-1, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _input_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """uint8 codes of the (smoothed) input, reused from a sibling that read the same tensor."""
        smoothing = self.input_smoothing if self.smoothing else None
        shared = self.shared_input
        if shared is not None and (hit := shared.lookup(x, smoothing)) is not None:
            return hit
        smoothed = x if smoothing is None else x * smoothing
        codes = K.quantize_activation_u8(smoothed.reshape(-1, self.in_features))
        if shared is not None:
            shared.store(x, smoothing, codes)
        return codes

    def extra_repr(self) -> str:
        fused = "" if self.activation == "none" else f", activation={self.activation}"
        if self.output_dtype != torch.float32:
            fused += f", output_dtype={self.output_dtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, smoothing={self.smoothing}{fused}"


class Int8Embedding(_Int8Weight):
    """Embedding table as int8 codes with one scale per row; a lookup gathers codes, then scales."""

    reads_indices = True  # its input is integer ids (profiles and energy probes feed it zeros of int64)

    def __init__(self, source: nn.Embedding) -> None:
        super().__init__()
        if source.max_norm is not None or source.sparse:
            raise UnsupportedModelError("int8 Embedding supports tables without max_norm and sparse gradients")
        self.num_embeddings, self.embedding_dim = source.num_embeddings, source.embedding_dim
        self.padding_idx = source.padding_idx
        self._init_weight(source.weight, None)

    def macs(self, output: torch.Tensor) -> int:
        return 0  # a lookup

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        """A lookup reads only the gathered rows' codes, then scales each value."""
        return KernelCost("lookup", float_dtype_name(output.dtype), 0, output.numel() * self.weight_q.element_size(),
                          (("multiply", "fp32", output.numel()),))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = torch.nn.functional.embedding(ids, self.weight_q)  # (..., dim) int8: only the rows read
        return codes.to(torch.float32) * self.weight_step[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class _Int8Static(_Int8Weight):
    """Adds the calibrated input parameters: multiplier ``input_scale`` and ``input_zero_point``."""

    input_scale: torch.Tensor
    input_zero_point: torch.Tensor

    def _init_input(self) -> None:
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))

    def set_input(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.input_scale.copy_(scale.reshape(()))
        self.input_zero_point.copy_(zero.reshape(()))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return K.quantize_activation(x, self.input_scale, self.input_zero_point.to(torch.float32))

    def check_loaded(self) -> None:
        super().check_loaded()
        if not (bool(torch.isfinite(self.input_scale)) and float(self.input_scale) > 0):
            raise ModelFormatError(f"{type(self).__name__}: the input scale must be finite and > 0")
        if not K.INT8_MIN <= int(self.input_zero_point) <= K.INT8_MAX:
            raise ModelFormatError(f"{type(self).__name__}: the input zero point lies outside int8")


class Int8StaticLinear(_Int8Static):
    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self._init_weight(source.weight, source.bias)
        self._init_input()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from nnopt.io.onnx_export import static_int8

            return static_int8(self, x)
        flat = x.reshape(-1, self.in_features)
        zero = self.input_zero_point
        out = K.int8_linear(
            self.quantize_input(flat), self.input_scale, zero, self.weight_q, self.weight_step, self.weight_colsum,
            self.bias, self.gemm_codes_fp32(),
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _Int8StaticConv(_Int8Static):
    """A 1-D or 2-D convolution (any groups, stride, dilation, padding and padding mode) with int8 weights per
    output channel and a calibrated int8 input.

    Padding holds the code of 0.0 (the zero point), or the padded codes for reflect/replicate/circular, so
    the integer sums equal those of the float layer's padded input. The sums run as an int8 GEMM over
    im2col patches where ``torch._int_mm`` is the int8 GEMM chosen here and the layer has one group, else as
    exact float32 convolutions of the codes (:func:`nnopt.layers.kernels.conv_path`): the same integers, at
    fp32 speed plus the quantization passes, so slower than the float layer there.
    """

    geometry: ConvGeometry
    in_channels: int
    out_channels: int
    groups: int
    _conv_codes: tuple[tuple[int, int, str], torch.Tensor] | None = None
    _inside: tuple[tuple[object, ...], torch.Tensor] | None = None

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        geometry = ConvGeometry.of(source)
        if geometry.transposed:
            raise UnsupportedModelError("static int8 has no transposed-convolution kernel")
        geometry.copy_to(self)
        weight: torch.Tensor = source.weight  # type: ignore[assignment]
        self._init_weight(weight, source.bias)  # type: ignore[arg-type]
        self._init_input()

    def conv_path(self) -> str:
        return K.conv_path(self.groups, self.weight_q.device.type)

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        path = self.conv_path()
        cost = super().kernel_cost(inputs, output)
        if path == "torch-int-mm":
            return cost
        return dataclasses.replace(cost, kernel=f"int8 codes, {path} convolution", dtype="fp32")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            if self.geometry.dims != 2 or self.groups != 1 or not self.geometry.plain:
                raise UnsupportedModelError(
                    f"ONNX export of static int8 {self.geometry.describe()} is not supported "
                    "(only 2-D, groups=1, numeric zero padding)")
            from nnopt.io.onnx_export import static_int8

            return static_int8(self, x)
        path = self.conv_path()
        zero = self.input_zero_point
        if path == "torch-int-mm":
            codes = self.geometry.pad_codes(self.quantize_input(x).to(torch.float32), float(zero))
            return self._im2col_forward(codes)
        codes = K.activation_codes_float(x, self.input_scale, zero.to(torch.float32))
        g, shape = self.geometry, (-1, *([1] * self.geometry.dims))
        if g.padding_mode == "zeros":
            # conv pads with 0, not the zero point: Σ (x_q − z) w_q = conv(x_q) − z · (Σ of the taps that are
            # inside the input), a per-position constant of the input size
            acc = K.int8_conv(codes, self._codes_float(), g.run_centered, self.groups, path)
            acc = acc - zero.to(acc.dtype) * self._inside_sums(codes.shape[2:], acc.dtype)
        else:
            acc = K.int8_conv(g.pad_codes(codes, float(zero)), self._codes_float(), g.run_unpadded, self.groups, path)
            acc = acc - zero.to(acc.dtype) * self.weight_colsum.to(acc.dtype).view(shape)
        multiplier = (self.weight_step / self.input_scale).to(acc.dtype).view(shape)
        out = acc.mul_(multiplier) if self.bias is None else torch.addcmul(
            self.bias.to(acc.dtype).view(shape), acc, multiplier)
        return out.to(torch.float32)

    def _inside_sums(self, spatial: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """(out, *positions): the sum of each output position's weight codes over the taps inside the input
        (the full Σ w_q but at the borders); exact integers, cached per input size."""
        codes = self._codes_float()
        key = (tuple(spatial), codes.data_ptr(), K.tensor_version(self.weight_q), dtype)
        cached = self._inside
        if cached is None or cached[0] != key:
            ones = torch.ones(1, self.in_channels, *spatial, dtype=torch.float64, device=codes.device)
            sums = self.geometry.run_centered(ones, codes.double())[0].to(dtype)
            cached = self._inside = (key, sums)
        return cached[1]

    def _im2col_forward(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        planar = codes if g.dims == 2 else codes.unsqueeze(2)  # 1-D as a 1 × L image
        lift = (lambda t: t) if g.dims == 2 else (lambda t: (1, *t))
        cols = F.unfold(planar, lift(g.kernel_size), dilation=lift(g.dilation), stride=lift(g.stride))
        n, _, positions = cols.shape  # (n, in · kernel, positions)
        patches = cols.transpose(1, 2).reshape(n * positions, -1).to(torch.int8)
        out = K.int8_linear(
            patches, self.input_scale, self.input_zero_point, self.weight_q.flatten(1), self.weight_step,
            self.weight_colsum, self.bias,
        )  # (n · positions, out_channels)
        spatial = [
            (size - g.dilation[i] * (g.kernel_size[i] - 1) - 1) // g.stride[i] + 1
            for i, size in enumerate(codes.shape[2:])
        ]
        return out.reshape(n, *spatial, self.out_channels).movedim(-1, 1)

    def _codes_float(self) -> torch.Tensor:
        """The weight codes as float32 in the weight's shape, kept so that no call converts them again."""
        codes = self.weight_q
        key = (codes.data_ptr(), K.tensor_version(codes), str(codes.device))
        cached = self._conv_codes
        if cached is None or cached[0] != key:
            cached = self._conv_codes = (key, codes.to(torch.float32))
        return cached[1]

    def refresh(self) -> None:
        super().refresh()
        self._conv_codes = self._inside = None

    def extra_repr(self) -> str:
        groups = "" if self.groups == 1 else f", groups={self.groups}"
        return conv_repr(self, groups)


class Int8StaticConv2d(_Int8StaticConv):
    pass


class Int8StaticConv1d(_Int8StaticConv):
    pass


INT8_TYPES = (Int8DynamicLinear, Int8Embedding, Int8StaticLinear, Int8StaticConv1d, Int8StaticConv2d)
STATIC_TYPES: dict[type[nn.Module], type[_Int8Static]] = {
    nn.Linear: Int8StaticLinear, nn.Conv1d: Int8StaticConv1d, nn.Conv2d: Int8StaticConv2d,
}
