"""Energy one channel costs, for the energy-aware allocation (``allocation="energy"``).

Energy is power × time, and the power of one CPU running one model is the same whichever layer runs, so a
layer's energy is the CPU's active power × the time its kernel is measured to take here
(:func:`nnopt.metrics.layer_times.layer_times`). The analytic table (MACs × pJ) is not used: it counts
arithmetic and data movement only, and can call a layer cheap that runs slowly on this CPU. A channel's cost
is its share of each layer it lives in: the layer's energy × the columns (rows) it occupies ÷ the layer's width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nnopt.energy.device_energy import ActivePower, cpu_active_power
from nnopt.errors import ConfigError
from nnopt.metrics.layer_times import METHOD as TIMING_METHOD
from nnopt.metrics.layer_times import layer_times
from nnopt.pruning.structured.groups import ChannelGroup, weight_dim

METHOD = "estimated: active power × measured layer time on this CPU"


def channel_layers(model: nn.Module, groups: list[ChannelGroup]) -> list[str]:
    """The weighted layers the groups' channels live in (norms left out: they cost next to nothing)."""
    names: dict[str, None] = {}
    for g in groups:
        for member in g.members:
            if member.role != "norm" and getattr(model.get_submodule(member.module), "weight", None) is not None:
                names[member.module] = None
    return list(names)


def channel_energy_j(model: nn.Module, groups: list[ChannelGroup], layer_j: Mapping[str, float]) -> dict[str, float]:
    """Energy (J per model call) that removing one channel of each group saves, from each layer's energy
    ``layer_j``: each member layer's share, its energy divided by the size of the dimension the channel occupies
    (times ``inner`` positions after a flatten). A layer missing from ``layer_j`` counts nothing."""
    saved = {}
    for g in groups:
        total = 0.0
        for member in g.members:
            module = model.get_submodule(member.module)
            weight = getattr(module, "weight", None)
            if member.role == "norm" or weight is None or member.module not in layer_j:
                continue
            width = weight.shape[weight_dim(module, member.role)]
            total += layer_j[member.module] * member.inner / width
        saved[g.name] = total
    return saved


def measured_channel_energy(
    model: nn.Module, groups: list[ChannelGroup], inputs: Any, power: ActivePower | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-channel energy of each group (J per call on ``inputs``): active ``power`` (default: this CPU's at
    torch's threads, estimated) × each layer's measured time; and the record of the layer times (ms)."""
    device = next((p.device.type for p in model.parameters()), "cpu")
    if device != "cpu":
        # measured on an H200, kernels of one model drew 19-385 W above idle: time alone does not rank GPU energy
        raise ConfigError(f'allocation="energy" ranks by CPU power × measured time; this model is on {device}, '
                          "where power differs by kernel (benchmarks/results/energy.md): prune it on the CPU, or "
                          'use allocation="global"')
    power = power or cpu_active_power(torch.get_num_threads())
    seconds = layer_times(model, inputs, channel_layers(model, groups))
    costs = channel_energy_j(model, groups, {name: power.mid_w * s for name, s in seconds.items()})
    return costs, {name: round(s * 1e3, 6) for name, s in seconds.items()}


def energy_record(power: ActivePower, inputs: str) -> dict[str, Any]:
    """What the energy-aware allocation ranked by, for the pass's details."""
    return {"method": f"{METHOD} ({power.low_w:.3g}–{power.high_w:.3g} W, the middle used; {power.source})",
            "watts": power.to_dict(), "timing": TIMING_METHOD, "inputs": inputs,
            "channel_cost": "the layer's energy × the channel's share of the layer's width, summed over its layers"}


def per_joule(
    groups: list[ChannelGroup], ranking: dict[str, torch.Tensor], energy: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Relative importance divided by the (relative) energy one channel of its group costs."""
    mean_energy = sum(energy.get(g.name, 0.0) for g in groups) / max(len(groups), 1) or 1.0
    return {g.name: ranking[g.name] / max(energy.get(g.name, 0.0) / mean_energy, 1e-6) for g in groups}
