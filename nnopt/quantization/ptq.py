"""Post-training int8: dynamic (activation ranges measured per call) and static (calibrated).

Both store weights as int8 codes, symmetric per output channel, and compute with a real int8
GEMM (``torch._int_mm``, see :mod:`nnopt.quantization.kernels`). Activations are per-tensor
asymmetric int8: measured at run time (dynamic) or fixed from a calibration set (static).

Dynamic quantization can first *smooth* activation outliers (SmoothQuant, Xiao et al. 2023):
``x W^T = (x / s)(W s)^T`` with ``s_k = max|x_k|^α / max|W_·k|^(1−α)`` per input channel, which
moves the outlier range of a few activation channels into the weights, where per-channel
scales absorb it. This needs a few calibration batches, and is what keeps per-tensor dynamic
activations accurate on transformer encoders.

When exported to ONNX (:mod:`nnopt.io.onnx_export`), dynamic layers become
``DynamicQuantizeLinear → MatMulInteger → Cast → Mul`` (fused by ONNX Runtime into its int8
kernels) and static layers become QuantizeLinear/DequantizeLinear pairs (QDQ form).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.lineage import AppliedPass
from nnopt.metrics.speed import MIN_SPEEDUP
from nnopt.quantization import kernels as K
from nnopt.quantization import primitives as P
from nnopt.quantization.encoder_fusion import apply_fusions, plan_fusions, shared_groups
from nnopt.quantization.kernel_choice import KERNEL_CHOICES, choose_kernels
from nnopt.quantization.registry import register_quantizer
from nnopt.quantization.targets import check_target
from nnopt.select import replace_layer, select_layers, validate_patterns

DYNAMIC_PASS = "quantize-int8-dynamic"
STATIC_PASS = "quantize-int8-static"
OBSERVER_NAMES = ("minmax", "percentile", "mse")
OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class DynamicQuantConfig(Config):
    """int8 weights per channel; activations quantized per tensor at run time; int8 GEMM.

    ``smoothing`` (SmoothQuant's α in (0, 1], None = off) needs ``data`` for calibration;
    ``calibration_samples`` caps how many inputs it reads. ``layers`` selects Linear layers
    (empty: all of them). ``embeddings`` also stores Embedding tables as int8 rows (a lookup
    dequantizes only the rows it reads), which is most of a transformer encoder's file.
    ``attention_dtype="bfloat16"`` has a BERT-family encoder's query, key and value projections
    write bfloat16, so that attention runs in bf16 (AMX/AVX-512 BF16 kernels on x86); the
    projections themselves stay int8.
    ``kernels="measured"`` times each selected Linear's fp32 and int8 kernels on this machine at the
    rows it sees for ``kernel_batch`` examples and quantizes only those where int8 is faster
    (:mod:`nnopt.quantization.kernel_choice`); ``"all"`` quantizes every selected Linear.
    """

    kind = "int8-dynamic"
    layers: tuple[str, ...] = ()
    smoothing: float | None = None
    calibration_samples: int = 64
    embeddings: bool = True
    attention_dtype: str = "float32"
    kernels: str = "all"
    kernel_batch: int = 32

    def validate(self) -> None:
        validate_patterns(self.layers)
        if self.smoothing is not None and not 0.0 < self.smoothing <= 1.0:
            raise ConfigError(f"DynamicQuantConfig.smoothing must lie in (0, 1], got {self.smoothing}")
        if self.calibration_samples < 1:
            raise ConfigError(f"DynamicQuantConfig.calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"DynamicQuantConfig.kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.kernel_batch < 1:
            raise ConfigError(f"DynamicQuantConfig.kernel_batch must be >= 1, got {self.kernel_batch}")
        if self.attention_dtype not in OUTPUT_DTYPES:
            known = ", ".join(OUTPUT_DTYPES)
            chosen = self.attention_dtype
            raise ConfigError(f"DynamicQuantConfig.attention_dtype must be one of {known}, got {chosen!r}")


@dataclasses.dataclass(frozen=True)
class StaticQuantConfig(Config):
    """int8 weights per channel and int8 activations with ranges calibrated on ``data``.

    ``observer`` picks how a range is chosen from calibration activations: ``minmax``,
    ``percentile`` (clips rare outliers) or ``mse`` (minimizes quantization error).
    ``layers`` selects Linear and Conv2d layers (empty: all of them).
    """

    kind = "int8-static"
    layers: tuple[str, ...] = ()
    observer: str = "minmax"
    calibration_samples: int = 256

    def validate(self) -> None:
        validate_patterns(self.layers)
        if self.observer not in OBSERVER_NAMES:
            raise ConfigError(
                f"StaticQuantConfig.observer must be one of {', '.join(OBSERVER_NAMES)}, got {self.observer!r}"
            )
        if self.calibration_samples < 1:
            raise ConfigError(f"StaticQuantConfig.calibration_samples must be >= 1, got {self.calibration_samples}")


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
        key = (codes.data_ptr(), codes._version, str(codes.device))
        cached = getattr(self, "_codes_fp32", None)
        if cached is None or cached[0] != key:
            cached = self._codes_fp32 = (key, codes.flatten(1).to(torch.float32))
        return cached[1]

    def set_weight(self, weight: torch.Tensor) -> None:
        scale, _ = P.compute_qparams(weight, 8, symmetric=True, channel_axis=0)
        self.weight_q.copy_(P.quantize(weight, scale, 0, 8, symmetric=True))
        self.weight_scale.copy_(scale.flatten())
        self.refresh()

    def dequantized_weight(self) -> torch.Tensor:
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
        self.in_channels, self.out_channels = source.in_channels, source.out_channels
        self.kernel_size, self.stride = source.kernel_size, source.stride
        self.padding, self.dilation = source.padding, source.dilation
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
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


INT8_TYPES = (Int8DynamicLinear, Int8Embedding, Int8StaticLinear, Int8StaticConv2d)
STATIC_TYPES: dict[type[nn.Module], type[_Int8Static]] = {nn.Linear: Int8StaticLinear, nn.Conv2d: Int8StaticConv2d}


# --------------------------------------------------------------------------- calibration


def calibration_inputs(data: Any, samples: int, batch_size: int = 64) -> Iterator[Any]:
    """Model inputs for calibration: from a :class:`Split` (its first ``samples`` rows' features)
    or an iterable of ready batches (tensors, tuples of tensors, or dicts of keyword inputs)."""
    from nnopt.data import Split

    if data is None:
        raise ConfigError("calibration needs data=...: a Split or an iterable of input batches")
    if isinstance(data, Split):
        if len(data) == 0:
            raise ConfigError("the calibration set is empty")
        x = data.x[:samples]
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size]
        return
    if isinstance(data, torch.Tensor):
        data = [data]
    seen = 0
    for batch in data:
        yield batch
        seen += _batch_len(batch)
        if seen >= samples:
            break
    if seen == 0:
        raise ConfigError("the calibration set is empty")


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.ndim else 1


def run_model(model: nn.Module, batch: Any) -> torch.Tensor:
    """Call ``model`` on one batch, turning a shape mismatch into an error that names the data."""
    try:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except (RuntimeError, ValueError, TypeError) as exc:
        shape = _describe(batch)
        raise ConfigError(f"calibration data of shape {shape} does not fit the model: {exc}") from None


def _describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return str(tuple(batch.shape)) if isinstance(batch, torch.Tensor) else type(batch).__name__


def observe_inputs(
    model: nn.Module, layers: list[tuple[str, nn.Module]], batches: Iterable[Any], make: Any
) -> dict[str, Any]:
    """Feed ``batches`` through ``model`` and let one observer per layer see that layer's input."""
    observers = {name: make() for name, _ in layers}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: observers[name].update(args[0].detach()))
        for name, module in layers
    ]
    try:
        with torch.inference_mode():
            was_training = model.training
            model.eval()
            for batch in batches:
                run_model(model, batch)
            model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return observers


class _ChannelAbsMax:
    """Running max |x| per input channel (the last dimension), for smoothing."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        current = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
        self.value = current if self.value is None else torch.maximum(self.value, current)


# --------------------------------------------------------------------------- the passes


def _targets(model: nn.Module, patterns: tuple[str, ...], allowed: tuple[type[nn.Module], ...]) -> list[Any]:
    K.require_int8_gemm(next((str(p.device) for p in model.parameters()), "cpu"))
    targets = select_layers(model, patterns, default_types=(*allowed, *INT8_TYPES))
    for name, module in targets:
        check_target(name, module, allowed, "this int8 scheme", already=((INT8_TYPES, "int8-quantized"),))
    return targets


def quantize_dynamic(model: nn.Module, config: DynamicQuantConfig, **context: Any) -> dict[str, Any]:
    if config.attention_dtype == "bfloat16":
        from nnopt.cpu import require_native_bf16

        require_native_bf16("DynamicQuantConfig(attention_dtype='bfloat16')")
    allowed = (nn.Linear, nn.Embedding) if config.embeddings else (nn.Linear,)
    selected = _targets(model, config.layers, allowed)
    tables = [(name, m) for name, m in selected if isinstance(m, nn.Embedding)]
    targets = [(name, m) for name, m in selected if isinstance(m, nn.Linear)]
    timings = {}
    if config.kernels == "measured" and targets:
        timings = choose_kernels(model, targets, config.kernel_batch, smoothing=config.smoothing is not None)
        targets = [(name, m) for name, m in targets if timings[name].int8_faster]
    plan = plan_fusions(model, {name for name, _ in targets}, attention_bf16=config.attention_dtype == "bfloat16")
    smoothing = _smoothing_vectors(model, targets, config, context.get("data"), shared_groups(plan))
    details: dict[str, Any] = {}
    for name, module in targets:
        qmodule = Int8DynamicLinear(module, smoothing=name in smoothing)
        weight = module.weight.detach()
        if name in smoothing:
            weight = weight * smoothing[name]
            qmodule.input_smoothing.copy_(1.0 / smoothing[name])
        qmodule.set_weight(weight)
        error = (qmodule.dequantized_weight() - weight).abs().max()
        replace_layer(model, name, qmodule)
        details[name] = {"shape": list(weight.shape), "smoothing": name in smoothing, "max_abs_error": float(error)}
        if name in timings:
            details[name]["measured"] = timings[name].to_dict()
    for dense in apply_fusions(model, plan, fold_values=True):
        details[dense]["smoothing"] = False  # now carried by the value projection's scales
        details[dense]["smoothing_in_value"] = True
    for name, module in tables:
        table = Int8Embedding(module)
        table.set_weight(module.weight.detach())
        replace_layer(model, name, table)
        error = (table.dequantized_weight() - module.weight.detach()).abs().max()
        details[name] = {"shape": list(module.weight.shape), "embedding": True, "max_abs_error": float(error)}
    result: dict[str, Any] = {"layers": details, "fusions": plan}
    if timings:
        result["kernel_choice"] = {
            "method": f"measured: median of alternated calls at {config.kernel_batch} examples, "
                      f"{torch.get_num_threads()} threads; int8 kept where >= {MIN_SPEEDUP}x faster",
            "kept_fp32": {name: t.to_dict() for name, t in timings.items() if not t.int8_faster},
        }
    return result


def _smoothing_vectors(
    model: nn.Module, targets: list[Any], config: DynamicQuantConfig, data: Any, groups: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """SmoothQuant's s per target Linear: s_k = max|x_k|^α / max|W_·k|^(1−α).

    Linears that share an input (``groups``) get one s from their joint weight range, so that
    the input is smoothed and quantized once for all of them.
    """
    if config.smoothing is None:
        return {}
    if data is None:
        raise ConfigError("DynamicQuantConfig.smoothing needs data=... to calibrate activation ranges")
    batches = calibration_inputs(data, config.calibration_samples)
    observed = observe_inputs(model, targets, batches, _ChannelAbsMax)
    modules = dict(targets)
    w_max = {name: module.weight.detach().abs().amax(dim=0) for name, module in targets}
    smoothing = {}
    for name in modules:
        act_max = observed[name].value
        if act_max is None:
            raise ConfigError(f"layer {name!r} saw no calibration input; is it used by forward()?")
        joint = torch.stack([w_max[member] for member in groups.get(name, [name])]).amax(dim=0)
        # clamped so that dead channels do not divide by zero
        s = act_max.clamp(min=1e-5) ** config.smoothing / joint.clamp(min=1e-5) ** (1 - config.smoothing)
        smoothing[name] = s.clamp(min=1e-5)
    return smoothing


def quantize_static(model: nn.Module, config: StaticQuantConfig, **context: Any) -> dict[str, Any]:
    from nnopt.quantization.observers import make_observer

    targets = _targets(model, config.layers, tuple(STATIC_TYPES))
    batches = calibration_inputs(context.get("data"), config.calibration_samples)
    observed = observe_inputs(model, targets, batches, lambda: make_observer(config.observer))
    details: dict[str, Any] = {}
    for name, module in targets:
        try:
            scale, zero = observed[name].qparams(bits=8, symmetric=False)
        except ValueError as exc:
            raise ConfigError(f"layer {name!r}: {exc}") from None
        qmodule = STATIC_TYPES[type(module)](module)
        qmodule.set_weight(module.weight.detach())
        qmodule.set_input(scale.to(torch.float32), zero.to(torch.int32))
        replace_layer(model, name, qmodule)
        details[name] = {
            "shape": list(module.weight.shape), "input_scale": float(scale), "input_zero_point": int(zero),
        }
    return {"layers": details, "observer": config.observer}


def replay_dynamic(model: nn.Module, applied: AppliedPass) -> None:
    for name, info in applied.details.get("layers", {}).items():
        if info.get("embedding"):
            replace_layer(model, name, Int8Embedding(_recorded(model, name, nn.Embedding)))
            continue
        module = _recorded(model, name, nn.Linear)
        replace_layer(model, name, Int8DynamicLinear(module, smoothing=bool(info.get("smoothing"))))
    apply_fusions(model, applied.details.get("fusions", {}), fold_values=False)


def replay_static(model: nn.Module, applied: AppliedPass) -> None:
    for name in applied.details.get("layers", {}):
        module = model.get_submodule(name)
        qtype = STATIC_TYPES.get(type(module))
        if qtype is None:
            raise ModelFormatError(f"recorded int8 layer {name!r} is a {type(module).__name__}, not Linear/Conv2d")
        replace_layer(model, name, qtype(module))


def _recorded(model: nn.Module, name: str, expected: type[nn.Module]) -> nn.Module:
    module = model.get_submodule(name)
    if not isinstance(module, expected):
        raise ModelFormatError(f"recorded int8 layer {name!r} is a {type(module).__name__}, not {expected.__name__}")
    return module


register_quantizer(DynamicQuantConfig, DYNAMIC_PASS, quantize_dynamic, replay_dynamic)
register_quantizer(StaticQuantConfig, STATIC_PASS, quantize_static, replay_static)
