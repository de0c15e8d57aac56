"""Post-training int8: dynamic (activation ranges measured per call) and static (calibrated).

Both store weights as int8 codes, symmetric per output channel, and compute with a real int8
GEMM (``torch._int_mm``, see :mod:`nnopt.layers.kernels`). Activations are per-tensor
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
from nnopt.errors import ConfigError, ModelFormatError
from nnopt.layers import kernels as K
from nnopt.layers.int8 import INT8_TYPES, STATIC_TYPES, Int8DynamicLinear, Int8Embedding
from nnopt.layers.recurrent import Int8DynamicRNN, rnn_kernel_choice
from nnopt.lineage import AppliedPass
from nnopt.metrics.speed import MIN_SPEEDUP
from nnopt.quantization import parts
from nnopt.quantization.encoder_fusion import apply_fusions, plan_fusions, shared_groups
from nnopt.quantization.kernel_choice import KERNEL_CHOICES, choose_kernels
from nnopt.quantization.targets import choose_targets
from nnopt.select import replace_layer, validate_patterns
from nnopt.techniques import Technique, calibration_rows, register_technique

DYNAMIC_PASS = "int8-dynamic"
STATIC_PASS = "int8-static"
OBSERVER_NAMES = ("minmax", "percentile", "mse")
OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class DynamicQuantConfig(Config):
    """int8 weights per channel; activations quantized per tensor at run time; int8 GEMM.

    ``smoothing`` (SmoothQuant's α in (0, 1], None = off) needs ``data`` for calibration;
    ``calibration_samples`` caps how many inputs it reads. ``layers`` selects Linear, LSTM and GRU
    layers (empty: all of them; inputs of any rank). An LSTM/GRU stores each matrix as int8 rows and runs
    fbgemm's int8 recurrence where it timed faster here, else the float one
    (:mod:`nnopt.layers.recurrent`). ``embeddings`` also stores Embedding tables as int8 rows (a lookup
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
    ``layers`` selects Linear, Conv1d and Conv2d layers (empty: all of them; convolutions of any groups,
    stride, dilation and padding mode). Layers it does not cover are recorded as ``skipped`` with the reason.
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


_ATTENTION_FP32 = (
    "left in fp32: nn.MultiheadAttention computes its projections inside torch's attention function "
    "(in_proj_weight is a raw parameter, out_proj's weight is read directly), which has no int8 path; "
    "WeightQuantConfig and ClusterConfig cover its matrices"
)
DYNAMIC_REASONS: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: _ATTENTION_FP32,
    **{t: "dynamic int8 covers Linear, LSTM/GRU and Embedding; a convolution needs calibrated activations "
          "(StaticQuantConfig) or weight-only quantization"
       for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    nn.RNN: "dynamic int8 covers LSTM and GRU, not the plain nn.RNN",
}
STATIC_REASONS: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: _ATTENTION_FP32,
    nn.Embedding: "a lookup has no float input to calibrate: DynamicQuantConfig (int8 rows) or weight-only covers it",
    nn.LSTM: "static int8 has no recurrent kernel: DynamicQuantConfig covers LSTM/GRU",
    nn.GRU: "static int8 has no recurrent kernel: DynamicQuantConfig covers LSTM/GRU",
    nn.ConvTranspose1d: "static int8 has no transposed-convolution kernel: weight-only quantization covers it",
    nn.ConvTranspose2d: "static int8 has no transposed-convolution kernel: weight-only quantization covers it",
}


def _targets(
    model: nn.Module, patterns: tuple[str, ...], allowed: tuple[type[nn.Module], ...],
    reasons: dict[type[nn.Module], str] | None = None,
) -> tuple[list[Any], dict[str, str]]:
    """The layers this int8 scheme quantizes, and those it leaves (default selection) with why."""
    K.require_int8_gemm(next((str(p.device) for p in model.parameters()), "cpu"))
    reasons = dict(STATIC_REASONS if reasons is None else reasons)
    if nn.Embedding not in allowed:
        reasons.setdefault(nn.Embedding, "DynamicQuantConfig(embeddings=False) leaves Embedding tables in fp32")
    return choose_targets(model, patterns, allowed, "this int8 scheme", already=((INT8_TYPES, "int8-quantized"),),
                          reasons=reasons, refuse=_refusal)


def _refusal(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "int8 Embedding covers tables without max_norm and sparse gradients"
    return parts.refusal(module)


def quantize_dynamic(model: nn.Module, config: DynamicQuantConfig, **context: Any) -> dict[str, Any]:
    if config.attention_dtype == "bfloat16":
        from nnopt.cpu import require_native_bf16

        require_native_bf16("DynamicQuantConfig(attention_dtype='bfloat16')")
    allowed = (nn.Linear, nn.LSTM, nn.GRU, *((nn.Embedding,) if config.embeddings else ()))
    selected, skipped = _targets(model, config.layers, allowed, DYNAMIC_REASONS)
    tables = [(name, m) for name, m in selected if isinstance(m, nn.Embedding)]
    recurrent = [(name, m) for name, m in selected if isinstance(m, (nn.LSTM, nn.GRU))]
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
        error = (qmodule.dense_weight() - weight).abs().max()
        replace_layer(model, name, qmodule)
        details[name] = {"shape": list(weight.shape), "smoothing": name in smoothing, "max_abs_error": float(error)}
        if name in timings:
            details[name]["measured"] = timings[name].to_dict()
    for dense in apply_fusions(model, plan, fold_values=True):
        details[dense]["smoothing"] = False  # now carried by the value projection's scales
        details[dense]["smoothing_in_value"] = True
    for name, source in tables:
        table = Int8Embedding(source)
        table.set_weight(source.weight.detach())
        replace_layer(model, name, table)
        error = (table.dense_weight() - source.weight.detach()).abs().max()
        details[name] = {"shape": list(source.weight.shape), "embedding": True, "max_abs_error": float(error)}
    for name, layer in recurrent:
        rnn = Int8DynamicRNN(layer)
        rnn.set_weights(layer)
        worst = max(float((rnn.matrix(n) - getattr(layer, n).detach()).abs().max()) for n in rnn.shape.weight_names())
        replace_layer(model, name, rnn)
        # informational: the recurrence a load runs is chosen again on that machine
        details[name] = {"recurrent": rnn.shape.mode, "max_abs_error": worst,
                         "measured": rnn_kernel_choice(rnn).to_dict()}
    result: dict[str, Any] = {"layers": details, "fusions": plan}
    if skipped:
        result["skipped"] = skipped
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

    targets, skipped = _targets(model, config.layers, tuple(STATIC_TYPES))
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
    result: dict[str, Any] = {"layers": details, "observer": config.observer}
    if skipped:
        result["skipped"] = skipped
    return result


def replay_dynamic(model: nn.Module, applied: AppliedPass) -> None:
    for name, info in applied.details.get("layers", {}).items():
        if info.get("embedding"):
            replace_layer(model, name, Int8Embedding(_recorded(model, name, nn.Embedding)))
            continue
        if info.get("recurrent"):
            replace_layer(model, name, Int8DynamicRNN(_recorded(model, name, (nn.LSTM, nn.GRU))))
            continue
        module = _recorded(model, name, nn.Linear)
        replace_layer(model, name, Int8DynamicLinear(module, smoothing=bool(info.get("smoothing"))))
    apply_fusions(model, applied.details.get("fusions", {}), fold_values=False)


def replay_static(model: nn.Module, applied: AppliedPass) -> None:
    for name in applied.details.get("layers", {}):
        module = model.get_submodule(name)
        qtype = STATIC_TYPES.get(type(module))
        if qtype is None:
            kind = type(module).__name__
            raise ModelFormatError(f"recorded int8 layer {name!r} is a {kind}, not Linear/Conv1d/Conv2d")
        replace_layer(model, name, qtype(module))


def _recorded(
    model: nn.Module, name: str, expected: type[nn.Module] | tuple[type[nn.Module], ...]
) -> nn.Module:
    module = model.get_submodule(name)
    if not isinstance(module, expected):
        kinds = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ModelFormatError(f"recorded int8 layer {name!r} is a {type(module).__name__}, not {kinds}")
    return module


register_technique(Technique(
    DynamicQuantConfig, "quantize", quantize_dynamic, replay_dynamic,
    needs_data=lambda c: "smoothing calibration" if c.smoothing is not None else None, data_for=calibration_rows,
    legacy_names=("quantize-int8-dynamic",),
))
register_technique(Technique(
    StaticQuantConfig, "quantize", quantize_static, replay_static, needs_data=lambda c: "calibration",
    data_for=calibration_rows, legacy_names=("quantize-int8-static",),
))
