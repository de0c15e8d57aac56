"""Per-layer choice between a Linear's fp32 kernel and its int8 dynamic kernel, by measurement here.

An int8 GEMM does a quarter of the fp32 work per multiply-accumulate, but dynamic quantization adds
a pass over the activations per call (range, quantize) and a rescale of the output: on narrow
layers (SimpleNet's 64-wide ones, a 10-way classifier) those passes cost more than the arithmetic
saves, and the "quantized" model runs slower than the float one. ``DynamicQuantConfig(kernels=
"measured")`` times both kernels of every selected Linear on this machine, at the rows it really
sees (its input shapes when the model runs on ``kernel_batch`` examples; a layer called several
times per forward is judged on the sum over its calls), and quantizes only the layers whose int8
kernel is at least ``MIN_SPEEDUP`` faster. Calls of equal shape share one measurement. Each layer
is timed on its own: where int8 layers would share work (the fused query/key/value input of a BERT
layer, GELU or residual epilogues) the measurement is conservative, and a layer left in fp32 drops
out of those fusions. The decisions and timings are recorded in the pass details; loading a saved
model replays the decisions, it does not measure again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError
from nnopt.metrics.speed import MIN_SPEEDUP

KERNEL_CHOICES = ("all", "measured")


@dataclasses.dataclass(frozen=True)
class KernelTiming:
    """Median time of a layer's fp32 and int8 kernels over its calls in one forward pass, at
    ``rows`` input rows in all."""

    rows: int
    fp32_ms: float
    int8_ms: float

    @property
    def int8_faster(self) -> bool:
        return self.fp32_ms >= self.int8_ms * MIN_SPEEDUP

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "fp32_ms": round(self.fp32_ms, 5), "int8_ms": round(self.int8_ms, 5),
                "kernel": "int8" if self.int8_faster else "fp32"}


Measure = Callable[[nn.Linear, tuple[int, ...], bool], KernelTiming]


def layer_input_shapes(model: nn.Module, names: Sequence[str], batch: int) -> dict[str, list[tuple[int, ...]]]:
    """The input shape of every call of each named Linear when ``model`` runs on ``batch`` example inputs."""
    from nnopt.metrics.speed import bind_call, example_batch

    shapes: dict[str, list[tuple[int, ...]]] = {}

    def remember(name: str, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if tensors:
            shapes.setdefault(name, []).append(tuple(tensors[0].shape))

    hooks = [model.get_submodule(name).register_forward_pre_hook(functools.partial(remember, name), with_kwargs=True)
             for name in names]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            bind_call(model, example_batch(model, batch))()
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    missing = [name for name in names if name not in shapes]
    if missing:
        raise ConfigError(f"kernels='measured': layer {missing[0]!r} saw no input in a forward pass; is it used?")
    return shapes


def time_kernels(module: nn.Linear, shape: tuple[int, ...], smoothing: bool) -> KernelTiming:
    """Both kernels of ``module`` on one seeded input of ``shape``, timed side by side."""
    from nnopt.layers.int8 import Int8DynamicLinear
    from nnopt.metrics.speed import compare_calls

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    int8 = Int8DynamicLinear(module, smoothing=smoothing)
    int8.set_weight(module.weight.detach())
    calls = {"fp32": functools.partial(module, x), "int8": functools.partial(int8, x)}
    with torch.inference_mode():
        timings = compare_calls(calls, shape[0], warmup=5, min_calls=20, min_seconds=0.2, rounds=4)
    return KernelTiming(rows=math.prod(shape[:-1]), fp32_ms=timings["fp32"].median_ms,
                        int8_ms=timings["int8"].median_ms)


def choose_kernels(
    model: nn.Module, targets: Sequence[tuple[str, nn.Linear]], batch: int, smoothing: bool,
    measure: Measure = time_kernels,
) -> dict[str, KernelTiming]:
    """Per target Linear, the timing of both kernels (``.int8_faster`` says which to use)."""
    if batch < 1:
        raise ConfigError(f"kernel_batch must be >= 1, got {batch}")
    shapes = layer_input_shapes(model, [name for name, _ in targets], batch)
    measured: dict[tuple[Any, ...], KernelTiming] = {}
    chosen = {}
    for name, module in targets:
        calls = []
        for shape in shapes[name]:
            key = (shape, module.in_features, module.out_features, module.bias is not None)
            if key not in measured:
                measured[key] = measure(module, shape, smoothing)
            calls.append(measured[key])
        chosen[name] = KernelTiming(rows=sum(t.rows for t in calls), fp32_ms=sum(t.fp32_ms for t in calls),
                                    int8_ms=sum(t.int8_ms for t in calls))
    return chosen
