"""Measured time of single layers: each layer's forward on the input it received in one model call.

The layers' inputs are captured in one forward pass of the model (forward pre-hooks), then every layer is
called on its own captured input and timed with :func:`nnopt.metrics.speed.compare_calls` (warm-up, then
alternated rounds, so drift in the machine's speed falls on all layers alike; the median call counts).
The cost stays small: about ``budget_s`` in all plus a few calls of each layer, whatever the model's size.

:func:`layer_costs` also times each Linear / Conv / ConvTranspose layer's *floor*: the same call cut to one
output channel (one group's inputs), on the same input. A small layer's time is mostly per-call overhead that
does not shrink with its width; the time above the floor is what removing channels can save.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nnopt.data import call_model
from nnopt.errors import ConfigError
from nnopt.metrics.profile import layer_macs
from nnopt.metrics.speed import bind_call, compare_calls

# Seconds of timing per layer at most (a fraction of a second), and calls of each layer at least:
# a model with many layers shares ``budget_s`` among them, down to ``MIN_CALLS`` calls each. Five rounds
# spread each layer's calls over the whole timing, so that a burst of other load on a shared machine
# (which stalls every call while it lasts) rarely covers most of one layer's calls.
SECONDS_PER_LAYER = 0.05
MIN_CALLS = 5
WARMUP = 2
ROUNDS = 5
METHOD = ("measured: each layer's forward on the input it received in one model call (captured with forward "
          "pre-hooks), median of alternated rounds after warm-up (nnopt.metrics.speed.compare_calls), "
          "× the times the model calls it")
FLOOR_METHOD = ("measured alike: the layer cut to one output channel (weight and bias sliced; one group's "
                "inputs) on the same input, timed in the same alternated rounds: its per-call overhead")
_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@dataclasses.dataclass(frozen=True)
class LayerTime:
    """One layer's measured seconds per model call, its floor's (None: no one-channel twin for this layer
    type or call) and its multiply-accumulates per model call (counted, :func:`nnopt.metrics.profile.layer_macs`)."""

    seconds: float
    floor_s: float | None
    macs: int


def layer_times(model: nn.Module, inputs: Any, names: Iterable[str], budget_s: float = 2.0) -> dict[str, float]:
    """Measured seconds per model call that each of the layers ``names`` takes on ``inputs`` (a batch the
    model accepts: a tensor, a tuple or a dict of inputs), on this CPU with torch's current threads.

    A layer the model calls k times counts k times its first call's time; a layer the model does not call
    on ``inputs`` is left out. Timing takes about ``budget_s`` in all (at most ``SECONDS_PER_LAYER`` per
    layer), plus ``WARMUP`` + ``MIN_CALLS`` calls of each layer.
    """
    return {name: t.seconds for name, t in _timed(model, inputs, names, budget_s, floors=False).items()}


def layer_costs(model: nn.Module, inputs: Any, names: Iterable[str], budget_s: float = 2.0) -> dict[str, LayerTime]:
    """As :func:`layer_times`, with each layer's floor (its one-output-channel twin timed in the same rounds)
    and MACs. The twins share ``budget_s`` with the layers: the timing costs no more in all."""
    return _timed(model, inputs, names, budget_s, floors=True)


def _timed(model: nn.Module, inputs: Any, names: Iterable[str], budget_s: float, floors: bool) -> dict[str, LayerTime]:
    if not budget_s > 0:
        raise ConfigError(f"budget_s must be > 0, got {budget_s}")
    modules = {name: model.get_submodule(name) for name in dict.fromkeys(names)}
    modes = {m: m.training for m in model.modules()}  # each module's own flag (a frozen BatchNorm stays in eval)
    try:
        model.eval()  # the layers run as in inference (dropout off, norms on their running statistics)
        with torch.no_grad():  # built outside inference mode: parameters cannot be inference tensors
            twins = {name: _twin(module) for name, module in modules.items()} if floors else {}
        with torch.inference_mode():
            captured = _capture(model, inputs, modules)
            if not captured:
                return {}
            calls = {name: _bound(modules[name], c.args, c.kwargs) for name, c in captured.items()}
            for name, c in captured.items():
                floor = _floor_call(twins.get(name), modules[name], c.args, c.kwargs)
                if floor is not None:
                    calls[f"{name}\0floor"] = floor
            per_layer = min(SECONDS_PER_LAYER, budget_s / len(calls))
            device = next((p.device.type for p in model.parameters()), "cpu")  # "cuda": synchronized per call
            timed = compare_calls(calls, batch=1, warmup=WARMUP, min_calls=MIN_CALLS, min_seconds=per_layer,
                                  rounds=ROUNDS, device=device)
    finally:
        for module, training in modes.items():
            module.training = training
    return {name: LayerTime(timed[name].median_ms / 1e3 * c.count,
                            timed[f"{name}\0floor"].median_ms / 1e3 * c.count if f"{name}\0floor" in timed else None,
                            c.macs * c.count)
            for name, c in captured.items()}


@dataclasses.dataclass(frozen=True)
class _Captured:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    count: int
    macs: int


def _capture(model: nn.Module, inputs: Any, modules: dict[str, nn.Module]) -> dict[str, _Captured]:
    """Each module's first (args, kwargs) and MACs in one call of ``model``, and how often it was called."""
    seen: dict[str, _Captured] = {}

    def pre_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = seen.get(name)
            seen[name] = _Captured(args, kwargs, 1, 0) if first is None else dataclasses.replace(
                first, count=first.count + 1)
        return record

    def post_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def count(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if seen[name].count == 1:  # the first call's MACs
                seen[name] = dataclasses.replace(seen[name], macs=int(layer_macs(module, output, args)))
        return count

    handles = [module.register_forward_pre_hook(pre_hook(name), with_kwargs=True) for name, module in modules.items()]
    handles += [module.register_forward_hook(post_hook(name)) for name, module in modules.items()]
    try:
        call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: seen[name] for name in modules if name in seen}


def _bound(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], object]:
    if len(args) == 1 and not kwargs:
        return bind_call(module, args[0])
    return functools.partial(module, *args, **kwargs)


def _floor_call(
    twin: nn.Module | None, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], object] | None:
    """The call of ``module``'s one-output-channel ``twin`` on its input (for a grouped convolution: one group's
    input channels), or None where there is no such twin (other layer types, several inputs). The twin is a
    module called like the layer, so that the module call's own overhead is in the floor too."""
    if twin is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if isinstance(module, nn.modules.conv._ConvNd):  # one group's input channels
        channel_dim = 1 if x.dim() == module.weight.dim() else 0  # batched or unbatched input
        x = x.narrow(channel_dim, 0, module.in_channels // module.groups).contiguous()
    return bind_call(twin, x)


def _twin(module: nn.Module) -> nn.Module | None:
    """A plain layer like ``module`` with one output channel (one group's inputs), its weights sliced from it."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return None
    has_bias, like = isinstance(bias, torch.Tensor), {"device": weight.device, "dtype": weight.dtype}
    twin: nn.Module
    if isinstance(module, nn.Linear):
        twin, one = nn.Linear(module.in_features, 1, bias=has_bias, **like), weight[:1]
    elif isinstance(module, nn.modules.conv._ConvNd) and weight.dim() - 2 in _CONV:
        group_in, dims = module.in_channels // module.groups, weight.dim() - 2
        shared = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "bias": has_bias,
                  "padding_mode": module.padding_mode, **like}
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, *kernel)
            twin = _CONV_T[dims](group_in, 1, module.kernel_size, output_padding=module.output_padding, **shared)
            one = weight[:group_in, :1]
        else:
            twin, one = _CONV[dims](group_in, 1, module.kernel_size, **shared), weight[:1]
    else:
        return None
    twin.weight.data = one.contiguous()
    if has_bias:
        twin.bias.data = bias[:1].contiguous()  # type: ignore[index]
    return twin.eval()
