"""Solve for the channel ratio that gives a requested MACs reduction.

MACs per sample come from nnopt's own profiler (:func:`nnopt.metrics.profile.count_macs`), run once on
the unpruned model. A Linear or convolution's MACs are proportional to its output channels times its
input channels per group (the spatial sizes do not change), so each trial's count is the profiler's
per-layer count scaled by the widths that trial keeps: exact, and no forward pass per trial. A model
with MACs elsewhere (attention products, recurrent layers) is counted on a pruned copy instead.

A bisection over the ratio finds the smallest one whose (rounded) counts reach the target; then the
groups where that ratio removed more than the one just below it give channels back, cheapest first,
as long as the target still holds: the result is never short of the target and over it by less
than one step of the channel counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError
from nnopt.pruning.structured.groups import CONV_LAYERS, ChannelGroup, is_depthwise
from nnopt.pruning.structured.surgery import removed_positions

MAX_RATIO = 0.95
ITERATIONS = 14

Removed = dict[str, torch.Tensor]


def total_macs(model: nn.Module, input_shape: Sequence[int] | None) -> int:
    """MACs per sample, by :func:`nnopt.metrics.profile.count_macs`."""
    from nnopt.metrics.profile import count_macs, model_input_shape

    return int(sum(count_macs(model, tuple(input_shape or model_input_shape(model))).values()))


class MacCounter:
    """MACs per sample of ``model`` with some channels removed (see the module's docstring)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int],
                 cut: Callable[[nn.Module, list[ChannelGroup], Removed], None]) -> None:
        from nnopt.metrics.profile import count_macs

        self.model, self.shape, self.cut = model, tuple(input_shape), cut
        self.layers = count_macs(model, self.shape)
        self.before = int(sum(self.layers.values()))
        self.scalable = all(type(model.get_submodule(name)) in (nn.Linear, *CONV_LAYERS)
                            for name, macs in self.layers.items() if macs)

    def __call__(self, groups: list[ChannelGroup], removed: Removed) -> int:
        if not self.scalable:
            twin = copy.deepcopy(self.model)
            self.cut(twin, groups, removed)
            return total_macs(twin, self.shape)
        gone = removed_positions(groups, removed)
        total = 0.0
        for name, macs in self.layers.items():
            roles = gone.get(name)
            if not macs or not roles:
                total += macs
                continue
            module = self.model.get_submodule(name)
            linear = isinstance(module, nn.Linear)
            out = int(module.out_features if linear else module.out_channels)  # type: ignore[arg-type]
            inp = int(module.in_features if linear else module.in_channels)  # type: ignore[arg-type]
            if is_depthwise(module):  # one input channel per group: MACs follow the outputs only
                total += macs * (out - len(roles.get("depthwise", ()))) / out
            else:
                total += macs * (out - len(roles.get("out", ()))) / out * (inp - len(roles.get("in", ()))) / inp
        return round(total)


def solve_ratio(
    model: nn.Module, groups: list[ChannelGroup], target: float, input_shape: Sequence[int] | None,
    allocate: Callable[[float], Removed], cut: Callable[[nn.Module, list[ChannelGroup], Removed], None],
) -> tuple[Removed, dict[str, Any]]:
    """The channels to remove for ``target``× fewer MACs, and the record (ratio, MACs before and
    after, trials). ``allocate(ratio)`` gives the channels to remove per group at a ratio;
    ``cut(copy, groups, removed)`` removes them from a copy (for models whose MACs do not scale)."""
    if input_shape is None:
        from nnopt.metrics.profile import model_input_shape

        input_shape = model_input_shape(model)
    count = MacCounter(model, input_shape, cut)
    trials: list[dict[str, Any]] = []

    def reduction(ratio: float, removed: Removed | None = None) -> float:
        achieved = count.before / max(count(groups, allocate(ratio) if removed is None else removed), 1)
        trials.append({"ratio": round(ratio, 5), "mac_reduction": round(achieved, 4)})
        return achieved

    if reduction(MAX_RATIO) < target:
        raise ConfigError(
            f"target_mac_reduction {target} is out of reach: removing {MAX_RATIO:.0%} of every prunable group's "
            f"channels gives {trials[-1]['mac_reduction']}x fewer MACs (the frozen layers keep the rest)"
        )
    low, high = 0.0, MAX_RATIO
    for _ in range(ITERATIONS):
        middle = (low + high) / 2
        if reduction(middle) >= target:
            high = middle
        else:
            low = middle
    removed, fewer = dict(allocate(high)), allocate(low)
    # give back channels, group by group, where the step from ``low`` to ``high`` overshot the target
    costs = {g.name: count(groups, {g.name: removed[g.name]}) for g in groups if g.name in removed}
    for g in sorted(groups, key=lambda g: count.before - costs.get(g.name, count.before)):
        if g.name in removed and removed[g.name].numel() > fewer[g.name].numel():
            trial = {**removed, g.name: fewer[g.name]}
            if count.before / max(count(groups, trial), 1) >= target:
                removed = trial
    after = count(groups, removed)
    return removed, {"target": target, "ratio": high, "macs_before": count.before, "macs_after": after,
                     "achieved": round(count.before / max(after, 1), 4), "counted": "scaled per layer"
                     if count.scalable else "pruned copies", "trials": trials}
