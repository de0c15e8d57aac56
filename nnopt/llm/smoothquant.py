"""SmoothQuant W8A8 (Xiao et al. 2022, arXiv:2211.10438) on the layer-by-layer engine.

int8 activations lose the most on the few input channels with outliers. SmoothQuant moves part of that
range into the weights, which quantize per output channel and take it well: for each group of Linears fed
one input (:mod:`nnopt.llm.smoothing`), every input channel ``j`` is divided by

    s_j = max|X_j|^α / max|W_j|^(1−α)

(``max|X_j|`` over the calibration tokens, ``max|W_j|`` over the column ``j`` of every consumer; ``α = 0.5``
by default) and the consumers' columns multiplied by it, folded into the RMSNorms (q/k/v, gate/up) and, with
``fold_linear_producers``, into v_proj's rows for o_proj (without grouped-query attention) and up_proj's
rows for down_proj. Then weights are int8 per output channel (symmetric) and every decoder Linear's input
is quantized to int8 per token, dynamically (symmetric, ``max |x|`` of the token over 127.5, as
compressed-tensors computes it), at inference.

The output is compressed-tensors ``pack-quantized`` with ``input_activations`` :data:`ACTIVATION_SCHEME`
in its quantization_config. transformers (5.25, with compressed-tensors 0.20.1) applies that activation
quantization in the forward of every targeted Linear when it loads the directory normally (not with
``CompressedTensorsConfig(dequantize=True)``, which drops it), so loading the output *is* the W8A8 model's
numerics (weights dequantized to float, activations rounded to the int8 grid; not int8 kernels).
:func:`fake_quant_activations` applies the same activation rounding to any model (e.g. one built from the
dequantized weights).

While calibrating, the carried hidden states pass through each layer with its Linears' inputs rounded per
token as they will be at inference (``quantize_carried_activations``), so later layers calibrate on what
they will see.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ConfigError
from nnopt.llm import smoothing, streaming
from nnopt.llm.layerwise import CalibrationConfig, LayerContext, LayerMethod, quantize_checkpoint_layerwise
from nnopt.quantization.weights import WeightQuantConfig

Codes = streaming.Codes
# compressed-tensors QuantizationArgs of dynamic per-token symmetric int8 activations (llm-compressor's W8A8)
ACTIVATION_SCHEME: dict[str, Any] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                     "dynamic": True, "group_size": None, "observer": None}
WEIGHTS = WeightQuantConfig(bits=8, per_channel=True)
# compressed-tensors' symmetric int8 range is [-128, 127] with scale max|x| / (255 / 2)
_HALF_RANGE, _QMIN, _QMAX = 127.5, -128.0, 127.0
# a decoder layer's Linear in a model's module names
_DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant's settings: the migration strength ``alpha`` in ``[0, 1]`` (0 moves the weights' range
    into the activations, 1 every activation outlier into the weights); ``fold_linear_producers`` also smooths
    o_proj's and down_proj's inputs through v_proj's and up_proj's rows (the paper smooths only the inputs
    that follow a norm);
    ``quantize_carried_activations`` carries the calibration states through the layers with int8 inputs."""

    alpha: float = 0.5
    fold_linear_producers: bool = True
    quantize_carried_activations: bool = True

    def validate(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"SmoothQuantConfig.alpha: must be in [0, 1], got {self.alpha!r}")
        for field in ("fold_linear_producers", "quantize_carried_activations"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"SmoothQuantConfig.{field}: must be true or false, got "
                                  f"{getattr(self, field)!r}")


def quantize_checkpoint_smoothquant(
    src_dir: str | Path, out_dir: str | Path, *, smooth: SmoothQuantConfig | None = None,
    calibration: CalibrationConfig | None = None, tokens: torch.Tensor | None = None,
    progress: streaming.ProgressFn | None = None, shard_bytes: int = streaming.DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """SmoothQuant W8A8 of a Hugging Face safetensors checkpoint to ``out_dir``, layer by layer: smoothing
    folded in, int8 per-channel weights (compressed-tensors pack-quantized) and dynamic per-token int8
    activations recorded for every decoder Linear. ``lm_head`` stays float. Returns the writer's figures
    plus the calibration tokens."""
    smooth = smooth or SmoothQuantConfig()
    smooth.validate()
    return quantize_checkpoint_layerwise(
        src_dir, out_dir, WEIGHTS, layer_method=smoothquant_layer_method(smooth), method="nnopt-smoothquant",
        settings={"smoothquant": dataclasses.asdict(smooth)}, calibration=calibration, tokens=tokens,
        progress=progress, shard_bytes=shard_bytes, input_activations=dict(ACTIVATION_SCHEME))


def smoothquant_layer_method(smooth: SmoothQuantConfig | None = None) -> LayerMethod:
    """The :data:`~nnopt.llm.layerwise.LayerMethod`: fold each group's smoothing scales, leave the weights to
    the engine's int8 RTN, and (``quantize_carried_activations``) hook the chosen Linears so that the
    engine's carrying pass rounds their inputs per token. The hooks stay on the engine's one-layer copy,
    which it drops after that pass."""
    smooth = smooth or SmoothQuantConfig()
    smooth.validate()

    def method(context: LayerContext) -> dict[str, Codes]:
        prefix = context.unit + "."
        for group in smoothing.scale_groups(context.layer):
            if group.producer not in ("input_layernorm", "post_attention_layernorm") and not (
                    smooth.fold_linear_producers):
                continue
            names = [prefix + consumer + ".weight" for consumer in group.consumers]
            chosen = [name for name in names if name in context.linears]
            if not chosen:
                continue
            consumers = [smoothing.weight_of(context.layer.get_submodule(c)).detach() for c in group.consumers]
            scales = smoothing_scales(context.stats[chosen[0]].absmax, consumers, smooth.alpha)
            smoothing.fold_scales(context.layer, group, scales)
        if smooth.quantize_carried_activations:
            for module in context.linears.values():
                module.register_forward_pre_hook(_quantize_input)
        return {}

    return method


def smoothing_scales(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``max|X_j|^α / max|W_j|^(1−α)`` per input channel (float64), ``max|W_j|`` over column ``j`` of every
    weight; 1 for channels never active, bounded below as in SmoothQuant's code."""
    x = absmax.double()
    w = torch.stack([weight.detach().abs().amax(dim=0) for weight in weights]).amax(dim=0).double()
    scales = (x.pow(alpha) / w.clamp(min=1e-5).pow(1.0 - alpha)).clamp(min=1e-5)
    return torch.where(x > 0, scales, torch.ones_like(scales))


def quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to symmetric int8 per token (last dimension) and back, exactly as compressed-tensors'
    dynamic ``token`` strategy does for a ``(batch, sequence, features)`` input: scale ``max|x| / 127.5``,
    codes ``round(clamp(x / scale, −128, 127))``."""
    scale = x.abs().amax(dim=-1, keepdim=True) / _HALF_RANGE
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    return torch.round(torch.clamp(x / scale, _QMIN, _QMAX)) * scale


def fake_quant_activations(model: torch.nn.Module, names: list[str] | None = None) -> list[Any]:
    """Round the inputs of ``model``'s decoder-layer Linears (or of the modules ``names``) per token to int8
    in forward (:func:`quantize_per_token`), through forward pre-hooks; returns their handles
    (``handle.remove()`` undoes it). For evaluating W8A8 on a model that does not apply the activation
    scheme itself (e.g. loaded with ``dequantize=True``)."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and _DECODER_LINEAR.search(n)]
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ConfigError(f"fake_quant_activations: the model has no module {unknown[0]!r}")
    return [modules[n].register_forward_pre_hook(_quantize_input) for n in names]


def _quantize_input(module: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return (quantize_per_token(inputs[0]), *inputs[1:])
