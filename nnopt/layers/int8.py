"""int8 layers: weights as symmetric per-channel int8 codes, computed with a real int8 GEMM.

- :class:`Int8DynamicLinear` quantizes its input per call (per tensor, asymmetric);
- :class:`Int8StaticLinear` / :class:`Int8StaticConv2d` use a calibrated input scale and zero point;
- :class:`Int8Embedding` stores a table as int8 rows.

The GEMM is oneDNN's, ``torch._int_mm`` or an exact float32 product, whichever passed its
known-answer check on this CPU (:mod:`nnopt.layers.kernels`). The passes that create these layers
live in :mod:`nnopt.quantization.ptq`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.layers import kernels as K
from nnopt.layers import primitives as P
from nnopt.layers.protocol import (
    KernelCost,
    conv_macs,
    conv_repr,
    copy_conv_geometry,
    float_dtype_name,
    linear_macs,
    own_bytes,
)


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


class Int8StaticConv2d(_Int8Static):
    def __init__(self, source: nn.Conv2d) -> None:
        super().__init__()
        if source.padding_mode != "zeros" or source.groups != 1 or isinstance(source.padding, str):
            raise UnsupportedModelError("static int8 Conv2d supports groups=1 and numeric zero padding only")
        copy_conv_geometry(self, source)  # groups is 1
        self._init_weight(source.weight, source.bias)
        self._init_input()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            from nnopt.io.onnx_export import static_int8

            return static_int8(self, x)
        zero = self.input_zero_point
        patches, (out_h, out_w) = K.im2col_codes(
            self.quantize_input(x), zero, self.kernel_size, self.stride, self.padding, self.dilation
        )
        out = K.int8_linear(
            patches, self.input_scale, zero, self.weight_q.flatten(1), self.weight_step, self.weight_colsum,
            self.bias, self.gemm_codes_fp32(),
        )  # (n · out_h · out_w, out_channels)
        return out.reshape(x.shape[0], out_h, out_w, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return conv_repr(self, "")


INT8_TYPES = (Int8DynamicLinear, Int8Embedding, Int8StaticLinear, Int8StaticConv2d)
STATIC_TYPES: dict[type[nn.Module], type[_Int8Static]] = {nn.Linear: Int8StaticLinear, nn.Conv2d: Int8StaticConv2d}
