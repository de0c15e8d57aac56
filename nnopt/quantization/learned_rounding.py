"""Learned rounding of 8-bit weights (AdaRound: Nagel et al., 2020), on ONNX Runtime's per-channel grid.

Rounding each weight to its nearest grid point minimises each weight's own error, not the layer's
output error; for a network as sensitive as MobileNetV2 the difference is several points of top-1
agreement. For every Conv/Linear layer, in the order the model calls them, a soft choice between
rounding down and up, ``h(V) ∈ [0, 1]`` (a rectified sigmoid), is fitted with Adam so that the
layer's output on calibration inputs matches the float layer's output; a regulariser whose exponent
is annealed from 20 to 2 pushes every ``h`` to 0 or 1, and the choice is then made hard.

The layer's inputs come from the model as quantized so far (earlier layers already on their learned
grid, every layer input fake-quantized to 8 bits over its calibration range, as the int8 runtime does),
the targets from the float model: each layer learns to undo part of the error that reaches it.

The result is a float model whose weights lie exactly on the grid ONNX Runtime will use
(:func:`nnopt.quantization.equalize.weight_grid`), so its quantizer recomputes the same codes: each
channel's largest-magnitude weight is kept as it was (ONNX Runtime derives the channel's step from it),
and every other weight is ``code × step`` with ``|code| ≤ 127``, which it rounds back to ``code``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from nnopt.errors import ConfigError

LEARNED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
STRETCH = (-0.1, 1.1)  # the rectified sigmoid's range before clipping to [0, 1] (AdaRound's γ, ζ)
MAX_CODE = 127  # symmetric codes −127..127 for both int8 and uint8 (zero point 128): ±128 would move the step


@dataclasses.dataclass(frozen=True)
class LearnedRoundingConfig:
    """``steps`` Adam steps per layer on ``batch`` calibration rows each; ``regularization``: weight of the term
    that drives each rounding choice to 0 or 1; ``quantize_inputs``: fake-quantize every layer's input to 8 bits
    while collecting the inputs (the int8 runtime's activations)."""

    steps: int = 300
    batch: int = 8
    learning_rate: float = 3e-2
    regularization: float = 1.0  # against the output error relative to nearest rounding's (1 at the start)
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    quantize_inputs: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ConfigError(f"learned rounding needs steps >= 1 and batch >= 1, got {self.steps} and {self.batch}")
        if self.learning_rate <= 0 or self.regularization < 0:
            raise ConfigError("learned rounding needs learning_rate > 0 and regularization >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"learned rounding: warmup is a fraction of the steps in [0, 1), got {self.warmup}")


@dataclasses.dataclass
class LayerRounding:
    """One layer's result: output MSE (relative to the float output's mean square) with nearest and learned
    rounding, on the calibration inputs, and the share of weights rounded the other way than nearest."""

    name: str
    nearest_error: float
    learned_error: float
    flipped: float

    def to_dict(self) -> dict[str, Any]:
        return {"nearest_error": self.nearest_error, "learned_error": self.learned_error, "flipped": self.flipped}


def grid_step(w: torch.Tensor, weights: str) -> torch.Tensor:
    """Per-output-channel step of ONNX Runtime's symmetric 8-bit weights, shaped to broadcast over ``w``."""
    if weights not in ("int8", "uint8"):
        raise ConfigError(f"weights must be 'int8' or 'uint8', got {weights!r}")
    dims = tuple(range(1, w.ndim))
    absmax = w.detach().to(torch.float32).abs().amax(dim=dims, keepdim=True)
    span = 254 if weights == "int8" else 255
    step = (2 * absmax.to(torch.float64) / span).to(torch.float32)
    return torch.where(step > 0, step, torch.ones_like(step))


def learn_rounding(model: nn.Module, calibration: torch.Tensor, weights: str = "uint8",
                   config: LearnedRoundingConfig = LearnedRoundingConfig(), layers: Sequence[str] | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[nn.Module, dict[str, LayerRounding]]:
    """A copy of ``model`` whose Conv/Linear weights (or the named ``layers``) lie on learned grid points.

    ``model`` is not modified. ``calibration``: input rows (e.g. 32–128 images). Returns the copy and each
    layer's :class:`LayerRounding`, in the order the layers were learned.
    """
    config.validate()
    grid_step(torch.ones(1, 1), weights)  # validates ``weights``
    if not isinstance(calibration, torch.Tensor) or len(calibration) < 1:
        raise ConfigError("learned rounding needs calibration inputs (a non-empty tensor)")
    reference = copy.deepcopy(model).eval()
    rounded = copy.deepcopy(model).eval()
    modules = dict(rounded.named_modules())
    unknown = [n for n in (layers or ()) if n not in modules]
    if unknown:
        raise ConfigError(f"learned rounding: no layer named {', '.join(unknown)}")
    order = _call_order(reference, calibration[:1], layers)
    ranges = _input_ranges(reference, order, calibration) if config.quantize_inputs else {}
    generator = torch.Generator().manual_seed(config.seed)
    results: dict[str, LayerRounding] = {}
    for index, name in enumerate(order):
        if progress:
            progress(f"learning the rounding of {name} ({index + 1}/{len(order)})")
        float_inputs = _layer_inputs(reference, name, calibration, {})
        quantized_inputs = _layer_inputs(rounded, name, calibration, ranges)
        layer: Any = modules[name]
        results[name] = _learn_layer(name, layer, float_inputs, quantized_inputs, weights, config, generator)
    return rounded, results


def _call_order(model: nn.Module, example: torch.Tensor, layers: Sequence[str] | None) -> list[str]:
    """Names of the learnable layers in the order one forward pass calls them (each once)."""
    wanted = set(layers) if layers is not None else None
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LEARNED_TYPES) and (wanted is None or name in wanted):
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, n=name: order.append(n) if n not in order else None))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if layers is not None:
        bad = [n for n in layers if n in dict(model.named_modules()) and n not in order]
        if bad:
            raise ConfigError("learned rounding takes Conv1d/Conv2d/Linear layers the model calls; "
                              f"not {', '.join(bad)}")
    return order


def _input_ranges(model: nn.Module, names: list[str], calibration: torch.Tensor) -> dict[str, tuple[float, float]]:
    from nnopt.quantization.layer_sensitivity import input_ranges

    return input_ranges(model, names, calibration)


class _Captured(Exception):
    """Raised by the capture hook: nothing after the layer needs to run."""


def _layer_inputs(model: nn.Module, name: str, calibration: torch.Tensor,
                  ranges: dict[str, tuple[float, float]], batch: int = 32) -> torch.Tensor:
    """The named layer's input on every calibration row; with ``ranges``, every layer input on the way is
    fake-quantized to 8 bits over its range (the layer's own input too)."""
    from nnopt.layers.primitives import fake_quantize, qparams_from_range

    modules = dict(model.named_modules())
    captured: list[torch.Tensor] = []
    handles = []

    def quantize(layer_name: str) -> Callable[..., Any]:
        scale, zero = qparams_from_range(*ranges[layer_name], bits=8, symmetric=False)

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (fake_quantize(args[0], scale, zero, bits=8, symmetric=False),) + args[1:]
        return hook

    def capture(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach().clone())
        raise _Captured

    try:
        for layer_name in ranges:
            handles.append(modules[layer_name].register_forward_pre_hook(quantize(layer_name)))
        handles.append(modules[name].register_forward_pre_hook(capture))  # after its own quantize hook
        with torch.inference_mode():
            for i in range(0, len(calibration), batch):
                try:
                    model(calibration[i:i + batch])
                except _Captured:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(captured)


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    low, high = STRETCH
    return (torch.sigmoid(v) * (high - low) + low).clamp(0, 1)


def _learn_layer(name: str, layer: Any, float_inputs: torch.Tensor, quantized_inputs: torch.Tensor, weights: str,
                 config: LearnedRoundingConfig, generator: torch.Generator) -> LayerRounding:
    original = layer.weight.detach().clone()
    step = grid_step(original, weights)
    scaled = original.to(torch.float32) / step
    floor = torch.floor(scaled).clamp(-MAX_CODE, MAX_CODE - 1)
    nearest = torch.round(scaled).clamp(-MAX_CODE, MAX_CODE)
    # each channel's largest |w| stays as it is: ONNX Runtime derives the channel's step from it
    absmax = original.abs().amax(dim=tuple(range(1, original.ndim)), keepdim=True)
    pinned = original.abs() == absmax
    # what ONNX Runtime makes of a pinned weight: uint8's ±127.5 steps round to code 128 or −128, clipped to 127
    pinned_value = (torch.round(scaled).clamp(-128 if weights == "uint8" else -MAX_CODE, MAX_CODE)
                    * step).to(original.dtype)
    low, high = STRETCH
    start = ((scaled - floor).clamp(0, 1) - low) / (high - low)  # h(v) equals the rest: nearest's soft twin
    v = torch.logit(start).requires_grad_(True)

    def on_grid(codes: torch.Tensor, deployed: bool = False) -> torch.Tensor:
        """The weights as ONNX Runtime computes with them, or (``deployed``) as written for it to quantize:
        the pinned weights as they were, so that it derives the same step."""
        # code ±127 × step can exceed max|w| by an ulp (int8), which would move ONNX Runtime's step
        grid = torch.clamp((codes * step).to(original.dtype), -absmax, absmax)
        return torch.where(pinned, original if deployed else pinned_value, grid)

    def output(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(layer, {"weight": w}, (x,))
        return out

    with torch.no_grad():
        target = torch.cat([output(original, float_inputs[i:i + 16]) for i in range(0, len(float_inputs), 16)])
    power = float(target.double().pow(2).mean()) or 1.0

    def error(w: torch.Tensor) -> float:
        with torch.no_grad():
            total = sum(float((output(w, quantized_inputs[i:i + 16]) - target[i:i + 16]).double().pow(2).sum())
                        for i in range(0, len(target), 16))
        return total / target.numel() / power

    nearest_error = error(on_grid(nearest))
    optimizer = torch.optim.Adam([v], lr=config.learning_rate)
    warm = int(config.warmup * config.steps)
    rows = len(quantized_inputs)
    for t in range(config.steps):
        idx = torch.randint(rows, (min(config.batch, rows),), generator=generator)
        h = _rectified_sigmoid(v)
        soft = torch.where(pinned, pinned_value, ((floor + h) * step).to(original.dtype))
        loss = (output(soft, quantized_inputs[idx]) - target[idx]).pow(2).mean() / (power * max(nearest_error, 1e-12))
        if t >= warm and config.regularization:
            beta = config.beta[0] + (config.beta[1] - config.beta[0]) * (t - warm) / max(1, config.steps - warm)
            loss = loss + config.regularization * (1 - (2 * h - 1).abs().pow(beta)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = (floor + (_rectified_sigmoid(v) >= 0.5).to(floor.dtype)).clamp(-MAX_CODE, MAX_CODE)
    learned_error = error(on_grid(learned))
    if not math.isfinite(learned_error) or learned_error >= nearest_error:  # never worse than nearest
        learned, learned_error = nearest, nearest_error
    with torch.no_grad():
        layer.weight.copy_(on_grid(learned, deployed=True))
    moved = ~pinned
    flipped = float((learned != nearest)[moved].double().mean()) if bool(moved.any()) else 0.0
    return LayerRounding(name, nearest_error, learned_error, flipped)
