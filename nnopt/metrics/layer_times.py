"""Measured time of single layers: each layer's forward on the input it received in one model call.

The layers' inputs are captured in one forward pass of the model (forward pre-hooks), then every layer is
called on its own captured input and timed with :func:`nnopt.metrics.speed.compare_calls` (warm-up, then
alternated rounds, so drift in the machine's speed falls on all layers alike; the median call counts).
The cost stays small: about ``budget_s`` in all plus a few calls of each layer, whatever the model's size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nnopt.data import call_model
from nnopt.errors import ConfigError
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


def layer_times(model: nn.Module, inputs: Any, names: Iterable[str], budget_s: float = 2.0) -> dict[str, float]:
    """Measured seconds per model call that each of the layers ``names`` takes on ``inputs`` (a batch the
    model accepts: a tensor, a tuple or a dict of inputs), on this CPU with torch's current threads.

    A layer the model calls k times counts k times its first call's time; a layer the model does not call
    on ``inputs`` is left out. Timing takes about ``budget_s`` in all (at most ``SECONDS_PER_LAYER`` per
    layer), plus ``WARMUP`` + ``MIN_CALLS`` calls of each layer.
    """
    if not budget_s > 0:
        raise ConfigError(f"budget_s must be > 0, got {budget_s}")
    modules = {name: model.get_submodule(name) for name in dict.fromkeys(names)}
    was_training = model.training
    try:
        model.eval()  # the layers run as in inference (dropout off, norms on their running statistics)
        with torch.inference_mode():
            captured = _capture(model, inputs, modules)
            if not captured:
                return {}
            calls = {name: _bound(modules[name], args, kwargs) for name, (args, kwargs, _) in captured.items()}
            per_layer = min(SECONDS_PER_LAYER, budget_s / len(calls))
            device = next((p.device.type for p in model.parameters()), "cpu")  # "cuda": synchronized per call
            timed = compare_calls(calls, batch=1, warmup=WARMUP, min_calls=MIN_CALLS, min_seconds=per_layer,
                                  rounds=ROUNDS, device=device)
    finally:
        model.train(was_training)
    return {name: timed[name].median_ms / 1e3 * captured[name][2] for name in calls}


def _capture(
    model: nn.Module, inputs: Any, modules: dict[str, nn.Module]
) -> dict[str, tuple[tuple[Any, ...], dict[str, Any], int]]:
    """Each module's first (args, kwargs) in one call of ``model``, and how often it was called."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any], int]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = seen.get(name)
            seen[name] = (args, kwargs, 1) if first is None else (first[0], first[1], first[2] + 1)
        return record

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, module in modules.items()]
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
