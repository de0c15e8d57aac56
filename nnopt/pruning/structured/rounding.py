"""Channel rounding: kept channel counts as multiples of what this CPU's kernels run well.

oneDNN (what PyTorch's and ONNX Runtime's CPU convolutions use) blocks channels by the vector width:
8 fp32 lanes with AVX2, 16 with AVX-512. A width off that block runs on a slower, padded or scalar
path, so a pruned convolution can be slower per MAC than its unpruned twin. ``channel_multiple``
rounds each group's kept count to the nearest multiple; ``"auto"`` picks the multiple by measurement:
:func:`measure_multiple` times a convolution shaped like the model's heaviest prunable convolution
(its kernel, stride and input size) at every output width around the one pruning would keep (the
input width rounded alike), and keeps the candidate multiple whose widths run fastest per MAC (a
smaller multiple wins ties within :data:`TIE`: finer steps cost less accuracy). Cached per process.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import ConfigError
from nnopt.pruning.structured.groups import ChannelGroup, is_depthwise

AUTO = "auto"
CANDIDATES = (1, 8, 16)  # 1: no rounding; 8 and 16: AVX2's and AVX-512's fp32 lanes
SPAN = 16  # widths measured: the kept width ± SPAN
REPEATS = 5
TIE = 0.03  # a larger multiple must run ≥ 3% faster per MAC to be chosen
_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def check_multiple(value: Any) -> None:
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"StructuredPruneConfig.channel_multiple must be an integer >= 1 or 'auto', got {value!r}")


def rounded_keep(keep: int, original: int, multiple: int, min_channels: int = 1) -> int:
    """``keep`` rounded to the nearest multiple of ``multiple``, within [multiple, original] and
    at least ``min_channels``; a group no larger than ``multiple`` keeps every channel."""
    if multiple <= 1:
        return keep
    if original <= multiple:
        return original
    kept = max(multiple, round(keep / multiple) * multiple)
    if kept < min_channels:
        kept = math.ceil(min_channels / multiple) * multiple
    return min(kept, original)


def representative_conv(model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor) -> dict[str, Any] | None:
    """The non-depthwise convolution with the most MACs per sample among those whose input and output
    channels are both prunable: its name, kernel,
    stride, padding, dilation, input and output sizes and channels (None when the model has none)."""
    # pruned on both sides (not the stem, which reads the image): its width moves as a pruned layer's does
    owned = {m.module for g in groups if g.prunable for m in g.members if m.role == "out"}
    owned &= {m.module for g in groups if g.prunable for m in g.members if m.role == "in"}
    found: dict[str, dict[str, Any]] = {}
    hooks = []

    def hook(name: str, module: nn.Conv2d, args: tuple[Any, ...], output: torch.Tensor) -> None:
        macs = output[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        found[name] = {"layer": name, "kernel": tuple(module.kernel_size), "stride": tuple(module.stride),
                       "padding": module.padding, "dilation": tuple(module.dilation),
                       "input": tuple(args[0].shape[2:]), "output": tuple(output.shape[2:]),
                       "in_channels": module.in_channels, "out_channels": module.out_channels, "macs": int(macs)}

    for name, module in model.named_modules():
        if name in owned and type(module) is nn.Conv2d and not is_depthwise(module) and module.groups == 1:
            hooks.append(module.register_forward_hook(lambda mod, a, o, name=name: hook(name, mod, a, o)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return max(found.values(), key=lambda f: f["macs"]) if found else None


def measure_multiple(conv: dict[str, Any], out_width: int, in_width: int,
                     candidates: tuple[int, ...] = CANDIDATES) -> dict[str, Any]:
    """Time a convolution shaped like ``conv`` (kernel, stride, input size) at output widths
    ``out_width`` ± SPAN, and for each candidate multiple m keep the mean time per MAC of the widths
    that are multiples of m, with the input width rounded to m too (each candidate in its own rounded
    world); the fastest per MAC wins, a smaller multiple on ties. Batch: enough images for ~1024
    output pixels per call (at most 32), the current torch thread count."""
    widths = list(range(max(1, out_width // 2, out_width - SPAN), out_width + SPAN + 1))  # tiny: all overhead
    pixels = math.prod(conv["output"])
    batch = max(1, min(32, math.ceil(1024 / max(pixels, 1))))
    key = (conv["kernel"], conv["stride"], str(conv["padding"]), conv["dilation"], conv["input"], tuple(widths),
           in_width, tuple(candidates), batch, torch.get_num_threads())
    if key in _CACHE:
        return {**_CACHE[key], "cached": True}
    shapes = sorted({(w, rounded_keep(in_width, conv["in_channels"], m)) for m in candidates for w in widths
                     if w % m == 0})
    weights = {s: torch.randn(s[0], s[1], *conv["kernel"]) for s in shapes}
    inputs = {s[1]: torch.randn(batch, s[1], *conv["input"]) for s in shapes}
    best_ns: dict[tuple[int, int], float] = {}
    macs = {}
    with torch.inference_mode():
        for s in shapes:  # warm up every shape once (oneDNN creates its primitives on first use)
            out = F.conv2d(inputs[s[1]], weights[s], None, conv["stride"], conv["padding"], conv["dilation"])
            macs[s] = out.numel() * s[1] * math.prod(conv["kernel"])
        for _ in range(REPEATS):  # alternate shapes, keep each one's fastest call (the least disturbed)
            for s in shapes:
                start = time.perf_counter_ns()
                F.conv2d(inputs[s[1]], weights[s], None, conv["stride"], conv["padding"], conv["dilation"])
                best_ns[s] = min(best_ns.get(s, math.inf), time.perf_counter_ns() - start)
    means = {}
    for m in candidates:
        per_mac = [best_ns[s] / macs[s] for s in shapes
                   if s[0] % m == 0 and s[1] == rounded_keep(in_width, conv["in_channels"], m)]
        if per_mac:
            means[m] = sum(per_mac) / len(per_mac)
    fastest = min(means.values())
    multiple = min(m for m, v in means.items() if v <= fastest * (1 + TIE))
    result = {
        "multiple": multiple,
        "measured": f"Conv2d shaped like the model's heaviest prunable convolution, batch {batch}, "
                    f"{torch.get_num_threads()} threads, fastest of {REPEATS} alternated calls per width",
        "layer": conv["layer"], "kernel": list(conv["kernel"]), "stride": list(conv["stride"]),
        "input_size": list(conv["input"]), "out_widths": [widths[0], widths[-1]],
        "in_widths": {str(m): rounded_keep(in_width, conv["in_channels"], m) for m in means},
        "ps_per_mac": {str(m): round(v * 1000, 3) for m, v in means.items()},
        "cached": False,
    }
    _CACHE[key] = result
    return result


def auto_multiple(model: nn.Module, groups: list[ChannelGroup], example: Any, ratio: float) -> dict[str, Any]:
    """``measure_multiple`` for ``model``'s heaviest prunable convolution at the width ``ratio`` keeps;
    multiple 1 (nothing measured) for a model without one."""
    conv = representative_conv(model, groups, example) if isinstance(example, torch.Tensor) else None
    if conv is None:
        return {"multiple": 1, "measured": "nothing: the model has no prunable 2-D convolution to time"}
    def kept(width: int) -> int:
        return max(1, round(width * (1 - ratio)))

    return measure_multiple(conv, kept(conv["out_channels"]), kept(conv["in_channels"]))
