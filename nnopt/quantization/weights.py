"""Weight quantization (the classic rule): store integer codes plus scale, dequantize to evaluate."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.lineage import AppliedPass
from nnopt.quantization import primitives as P
from nnopt.quantization.modules import QUANTIZED_TYPES, _QuantizedWeight
from nnopt.quantization.registry import register_quantizer
from nnopt.select import replace_layer, select_layers, validate_patterns

PASS_NAME = "quantize-weights"


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig(Config):
    """``w_q = round(w · S)`` with ``S`` from the bit width and the weights' range.

    ``per_channel`` gives each output channel its own ``S``; ``symmetric=False`` adds a zero point.
    ``layers`` selects layers (names, ``re:`` patterns, ``type:`` names); empty means every
    Linear and Conv2d.
    """

    kind = "quantize-weights"
    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        try:
            P.check_bits(self.bits)
        except ValueError as exc:
            raise ConfigError(f"WeightQuantConfig.bits: {exc}") from None
        validate_patterns(self.layers)


def quantize_weights(model: nn.Module, config: WeightQuantConfig, **context: Any) -> dict[str, Any]:
    """Replace selected layers in place with quantized twins; returns what was done per layer."""
    # Quantized twins are in the default selection so that re-quantizing names the problem.
    default_types = (*QUANTIZED_TYPES, *QUANTIZED_TYPES.values())
    targets = select_layers(model, config.layers, default_types=default_types)
    details: dict[str, Any] = {}
    for name, module in targets:
        if isinstance(module, _QuantizedWeight):
            raise UnsupportedModelError(f"layer {name!r} is already quantized")
        qtype = QUANTIZED_TYPES.get(type(module))
        if qtype is None:
            raise UnsupportedModelError(
                f"layer {name!r} is a {type(module).__name__}; weight quantization supports "
                + ", ".join(t.__name__ for t in QUANTIZED_TYPES)
            )
        weight = module.weight.detach()
        if not bool(torch.isfinite(weight).all()):
            raise UnsupportedModelError(f"layer {name!r} has NaN or infinite weights; they cannot be quantized")
        axis = 0 if config.per_channel else None
        scale, zero = P.compute_qparams(weight, config.bits, config.symmetric, channel_axis=axis)
        codes = P.quantize(weight, scale, zero, config.bits, config.symmetric)
        qmodule = qtype(module, config.bits, tuple(scale.shape))
        qmodule.set_codes(codes, scale, zero)
        replace_layer(model, name, qmodule)
        error = (qmodule.dequantized_weight() - weight).abs().max()
        details[name] = {"shape": list(weight.shape), "max_abs_error": float(error)}
    return {"layers": details}


def replay(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create the quantized layers a saved model records (codes are loaded afterwards)."""
    config = WeightQuantConfig.from_dict(applied.config, where=f"pass {applied.name!r}")
    for name in applied.details.get("layers", {}):
        module = model.get_submodule(name)
        qtype = QUANTIZED_TYPES.get(type(module))
        if qtype is None:
            raise ModelFormatError(f"recorded quantized layer {name!r} is a {type(module).__name__}, not Linear/Conv2d")
        shape = _qparam_shape(module.weight, config.per_channel)
        replace_layer(model, name, qtype(module, config.bits, shape))


def _qparam_shape(weight: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    if per_channel:
        return (weight.shape[0],) + (1,) * (weight.ndim - 1)
    return (1,) * weight.ndim


register_quantizer(WeightQuantConfig, PASS_NAME, quantize_weights, replay)
