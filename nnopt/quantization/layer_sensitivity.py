"""How much int8 hurts each layer of a float model alone, simulated in torch (fake quantization).

For one layer at a time, its weights are put on the runtime's per-channel grid
(:func:`nnopt.quantization.equalize.weight_grid`) and its input on an asymmetric 8-bit grid whose range
is the calibration data's min-max, every other layer staying in float; the score is the mean KL
divergence of the model's softmax outputs from the float model's on validation inputs. The layers
with the highest scores are those worth keeping in float when the whole int8 model misses its
fidelity target. One forward pass over the validation inputs per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nnopt.layers.primitives import fake_quantize, qparams_from_range
from nnopt.quantization.equalize import weight_grid

SIMULATED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def input_ranges(model: nn.Module, names: Sequence[str], calibration: torch.Tensor,
                 batch: int = 64) -> dict[str, tuple[float, float]]:
    """Min and max of each named layer's input over ``calibration``."""
    modules = dict(model.named_modules())
    ranges: dict[str, tuple[float, float]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            for i in range(0, len(calibration), batch):
                model(calibration[i:i + batch])
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def softmax_kl(reference: torch.Tensor, outputs: torch.Tensor) -> float:
    """Mean KL(softmax(reference) ‖ softmax(outputs)) over rows."""
    p = reference.double().log_softmax(-1)
    q = outputs.double().log_softmax(-1)
    return max(0.0, float((p.exp() * (p - q)).sum(-1).mean()))  # >= 0; rounding can print -0.0000


def int8_layer_sensitivity(model: nn.Module, calibration: torch.Tensor, validation: torch.Tensor,
                           weights: str = "int8", layers: Sequence[str] | None = None,
                           batch: int = 64) -> dict[str, float]:
    """KL divergence from the float outputs with only that layer in int8, by layer name, worst first.

    ``model`` is left as it was (weights restored, hooks removed).
    """
    modules = dict(model.named_modules())
    names = [n for n in (layers or [n for n, m in modules.items() if isinstance(m, SIMULATED_TYPES)])]
    was_training = model.training
    model.eval()  # before any forward pass: BatchNorm statistics and Dropout must not move
    try:
        return _scores(model, modules, names, calibration, validation, weights, batch)
    finally:
        model.train(was_training)


def _scores(model: nn.Module, modules: dict[str, nn.Module], names: list[str], calibration: torch.Tensor,
            validation: torch.Tensor, weights: str, batch: int) -> dict[str, float]:
    ranges = input_ranges(model, names, calibration, batch)

    def outputs() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(validation[i:i + batch]).float() for i in range(0, len(validation), batch)])

    reference = outputs()
    scores: dict[str, float] = {}
    for name in names:
        if name not in ranges:  # never called on the calibration inputs
            continue
        layer: Any = modules[name]
        lo, hi = ranges[name]
        scale, zero = qparams_from_range(lo, hi, bits=8, symmetric=False)
        original = layer.weight.detach().clone()
        handle = layer.register_forward_pre_hook(
            lambda _m, args, s=scale, z=zero: (fake_quantize(args[0], s, z, bits=8, symmetric=False),) + args[1:]
        )
        try:
            with torch.no_grad():
                layer.weight.copy_(weight_grid(original, weights))
            scores[name] = softmax_kl(reference, outputs())
        finally:
            handle.remove()
            with torch.no_grad():
                layer.weight.copy_(original)
    return dict(sorted(scores.items(), key=lambda item: -item[1]))
