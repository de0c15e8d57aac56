"""Weight-only quantization (the classic rule): store integer codes plus scales; compute with a weight-only
kernel where torch has one for the shape, else dequantize (see :mod:`nnopt.layers.weight_only`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.layers import primitives as P
from nnopt.layers.weight_only import COMPUTE_MODES, QUANTIZED_TYPES, QuantizedLinear, QuantizedMatrix, _QuantizedWeight
from nnopt.lineage import AppliedPass
from nnopt.quantization import parts
from nnopt.quantization.targets import choose_targets
from nnopt.select import replace_layer, validate_patterns
from nnopt.techniques import Technique, register_technique

PASS_NAME = "quantize-weights"
# Storage layouts recorded per layer, so that a load re-creates exactly the saved buffers.
STORAGE_CODES, STORAGE_PACKED = "int8", "int4-packed"
# Layers weight quantization covers: one weight (QUANTIZED_TYPES) or several matrices (LSTM, GRU, attention).
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (*QUANTIZED_TYPES, *parts.MULTI_MATRIX_TYPES)


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig(Config):
    """``w_q = round(w · S)`` with ``S`` from the bit width (2..8) and the weights' range.

    ``per_channel`` gives each output channel its own ``S``; ``group_size=G`` gives each run of ``G``
    consecutive input elements of an output row its own ``S`` (Conv2d: over the flattened
    in_channels·kh·kw), stored as (out, ceil(in / G)); where ``G`` does not divide a Linear's input
    dimension the last group is partial (576 inputs in groups of 128: four of 128 and one of 64, each with
    its own ``S``). ``G`` may not exceed a selected layer's input dimension. ``symmetric=False``
    adds a zero point. Symmetric codes of ≤ 4 bits are stored two per byte (``weight_packed``).
    ``compute="auto"`` runs Linear layers with torch's weight-only int4/int8 kernels (bf16 activations)
    where they support the shape (int8: layers of ≥ 131072 weights, where it measured faster);
    ``"kernel"`` uses them wherever supported; ``"dequantize"`` always rebuilds the fp32 weight (exact
    fp32 numerics; faster for large batches).
    ``layers`` selects layers (names, ``re:`` patterns, ``type:`` names); empty means every layer it
    covers: Linear (any input rank), Conv1d/Conv2d (any groups, padding mode), ConvTranspose1d/2d,
    Embedding (per-row scales with ``per_channel``), and each weight matrix of LSTM, GRU and
    ``nn.MultiheadAttention``; other weighted layers are recorded as skipped, with the reason.

    >>> int4 = WeightQuantConfig(bits=4, group_size=32)  # int4 weight-only, one scale per 32 inputs
    """

    kind = "quantize-weights"
    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    layers: tuple[str, ...] = ()
    group_size: int | None = None
    compute: str = "auto"

    def validate(self) -> None:
        try:
            P.check_quant_bits(self.bits)
        except ValueError as exc:
            raise ConfigError(f"WeightQuantConfig.bits: {exc}") from None
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"WeightQuantConfig.group_size: must be a positive integer or None, "
                              f"got {self.group_size!r}")
        if self.compute not in COMPUTE_MODES:
            raise ConfigError(f"WeightQuantConfig.compute: must be one of {', '.join(COMPUTE_MODES)}, "
                              f"got {self.compute!r}")
        validate_patterns(self.layers)


@dataclasses.dataclass(frozen=True)
class _LayerPlan:
    """Shapes and layout of one layer's quantized storage, derived from the config and the weight's shape."""

    qparam_shape: tuple[int, ...]
    packed: bool

    @property
    def storage(self) -> str:
        return STORAGE_PACKED if self.packed else STORAGE_CODES


def _plan(name: str, shape: torch.Size, config: WeightQuantConfig) -> _LayerPlan:
    out_dim, flat_in = shape[0], math.prod(shape[1:])
    if config.group_size is not None:
        if config.group_size > flat_in:
            what = "input dimension" if len(shape) == 2 else "flattened input dimension (in_channels·kh·kw)"
            raise ConfigError(f"WeightQuantConfig.group_size: {config.group_size} exceeds the {what} "
                              f"{flat_in} of layer {name!r} (per_channel=True gives one scale per row)")
        # A group size that does not divide flat_in leaves a partial last group with its own scale.
        qparam_shape: tuple[int, ...] = (out_dim, P.group_count(flat_in, config.group_size))
    elif config.per_channel:
        qparam_shape = (out_dim,) + (1,) * (len(shape) - 1)
    else:
        qparam_shape = (1,) * len(shape)
    # An odd input dimension cannot split into byte pairs: such layers keep one int8 per code.
    packed = config.bits <= 4 and config.symmetric and flat_in % 2 == 0
    return _LayerPlan(qparam_shape, packed)


def _make_module(
    module: nn.Module | torch.Tensor, config: WeightQuantConfig, plan: _LayerPlan, packed: bool | None = None
) -> _QuantizedWeight:
    qtype = QuantizedMatrix if isinstance(module, torch.Tensor) else QUANTIZED_TYPES[type(module)]
    return qtype(module, config.bits, plan.qparam_shape, group_size=config.group_size,  # type: ignore[arg-type]
                 packed=plan.packed if packed is None else packed, compute=config.compute)


def _qparams_and_codes(
    weight: torch.Tensor, config: WeightQuantConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes in the weight's shape, S, z) per tensor, channel or group."""
    if config.group_size is None:
        axis = 0 if config.per_channel else None
        scale, zero = P.compute_qparams(weight, config.bits, config.symmetric, channel_axis=axis)
        return P.quantize(weight, scale, zero, config.bits, config.symmetric), scale, zero
    # Groups run along the flattened input dimension (in·kh·kw for Conv2d); stored as (out, groups).
    rows = weight.reshape(weight.shape[0], -1)
    scale, zero = P.compute_group_qparams(rows, config.bits, config.symmetric, config.group_size)
    codes = P.quantize_grouped(rows, scale, zero, config.bits, config.symmetric, config.group_size)
    return codes.reshape(weight.shape), scale.squeeze(-1), zero.squeeze(-1)


def _refusal(module: nn.Module) -> str | None:
    """Why one layer of a covered type cannot be quantized here (checked before anything changes), or None."""
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "weight quantization covers Embedding tables without max_norm and sparse gradients"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and module.padding_mode != "zeros":
        return "transposed convolutions support zero padding only"
    return parts.refusal(module)


def _group_refusal(module: nn.Module, config: WeightQuantConfig) -> str | None:
    """With the default selection, a convolution, table or recurrent/attention layer whose input size
    ``group_size`` does not divide stays float (a 3-channel stem's 3·k·k, a depthwise 3×3's 9), as before
    partial groups existed; layers selected by ``layers``, and any Linear (whose sizes the group size is
    chosen for), get a partial last group (or are refused by :func:`_plan` when the group is wider than
    their input)."""
    if config.group_size is None or config.layers or type(module) is nn.Linear or _refusal(module):
        return None
    weights = parts.matrices(module) if isinstance(module, parts.MULTI_MATRIX_TYPES) else {"": module.weight}
    for key, weight in weights.items():
        flat_in = math.prod(weight.shape[1:])
        if flat_in % config.group_size:
            where = f" ({key})" if key else ""
            return f"group_size {config.group_size} does not divide its flattened input dimension {flat_in}{where}"
    return None


def quantize_weights(model: nn.Module, config: WeightQuantConfig, **context: Any) -> dict[str, Any]:
    """Replace selected layers in place with quantized twins; returns what was done per layer.

    Every selected layer is checked (type, finite weights, group size) before any is replaced, so a
    failure leaves the model as it was. LSTM/GRU and attention layers get each weight matrix quantized
    (recorded under ``parts``); layer types not covered are listed under ``skipped`` with the reason.
    """
    def refuse(module: nn.Module) -> str | None:
        return _refusal(module) or _group_refusal(module, config)

    targets, skipped = choose_targets(
        model, config.layers, SUPPORTED_TYPES, "weight quantization",
        already=((_QuantizedWeight, "quantized"),), refuse=refuse,
    )
    prepared: list[tuple[str, nn.Module, dict[str, tuple[torch.Tensor, _QuantizedWeight]]]] = []
    for name, module in targets:
        weights = parts.matrices(module) if isinstance(module, parts.MULTI_MATRIX_TYPES) else {"": module.weight}
        planned = {}
        for key, weight in weights.items():
            where = f"{name}.{key}" if key else name
            plan = _plan(where, weight.shape, config)
            try:
                planned[key] = (weight.detach(), _make_module(weight if key else module, config, plan))
            except ValueError as exc:  # e.g. a layer the quantized twin cannot run
                raise UnsupportedModelError(f"layer {where!r}: {exc}") from None
        prepared.append((name, module, planned))
    details: dict[str, Any] = {}
    for name, module, planned in prepared:
        infos = {}
        for key, (weight, qmodule) in planned.items():
            codes, scale, zero = _qparams_and_codes(weight, config)
            qmodule.set_codes(codes, scale, zero)
            infos[key] = {
                "shape": list(weight.shape),
                "max_abs_error": float((qmodule.dense_weight() - weight).abs().max()),
                "storage": STORAGE_PACKED if qmodule.packed else STORAGE_CODES,
                # Informational (replay does not read it): the path a float32 CPU input takes.
                "kernel": qmodule.compute_path if isinstance(qmodule, QuantizedLinear) else "dequantize",
            }
        if "" in planned:
            replace_layer(model, name, planned[""][1])
            details[name] = infos[""]
        else:
            replace_layer(model, name, parts.assemble(module, {k: q for k, (_, q) in planned.items()}))
            details[name] = {"type": type(module).__name__, "parts": infos}
    result: dict[str, Any] = {"layers": details}
    if skipped:
        result["skipped"] = skipped
    return result


def replay(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create the quantized layers a saved model records (codes are loaded afterwards)."""
    config = WeightQuantConfig.from_dict(applied.config, where=f"pass {applied.name!r}")
    for name, info in applied.details.get("layers", {}).items():
        module = model.get_submodule(name)
        if type(module) not in SUPPORTED_TYPES:
            raise ModelFormatError(f"recorded quantized layer {name!r} is a {type(module).__name__}, which weight "
                                   "quantization does not cover")
        info = info if isinstance(info, dict) else {}
        if isinstance(module, parts.MULTI_MATRIX_TYPES):
            recorded = info.get("parts")
            if not isinstance(recorded, dict):
                raise ModelFormatError(f"pass {applied.name!r}: layer {name!r} must record its parts")
            built = {key: _replayed(applied, f"{name}.{key}", weight, weight, config, recorded.get(key))
                     for key, weight in parts.matrices(module).items()}
            replace_layer(model, name, parts.assemble(module, built))
        else:
            replace_layer(model, name, _replayed(applied, name, module, module.weight, config, info))


def _replayed(
    applied: AppliedPass, name: str, source: nn.Module | torch.Tensor, weight: Any, config: WeightQuantConfig,
    info: Any,
) -> _QuantizedWeight:
    try:
        plan = _plan(name, weight.shape, config)
    except ConfigError as exc:
        raise ModelFormatError(f"pass {applied.name!r}: {exc}") from None
    # The recorded layout wins over today's rule, so files keep loading if the rule changes.
    storage = info.get("storage") if isinstance(info, dict) else None
    if storage not in (None, STORAGE_CODES, STORAGE_PACKED):
        raise ModelFormatError(f"pass {applied.name!r}: layer {name!r} records unknown storage {storage!r}")
    packed = None if storage is None else storage == STORAGE_PACKED
    return _make_module(source, config, plan, packed)


register_technique(Technique(
    WeightQuantConfig, "quantize", quantize_weights, replay,
    presets={"int8-weight": {"bits": 8, "per_channel": True}, "int4-weight": {"bits": 4, "per_channel": True}},
))
