"""Energy one channel costs, for the energy-aware allocation (``allocation="energy"``).

Energy is power × time, and the power of one CPU running one model is the same whichever layer runs, so a
layer's energy is the CPU's active power × the time its kernel is measured to take here
(:func:`nnopt.metrics.layer_times.layer_costs`). The analytic table (MACs × pJ) is not used: it counts
arithmetic and data movement only, and can call a layer cheap that runs slowly on this CPU. A channel's cost
is its share of each layer it lives in: the layer's energy × the columns (rows) it occupies ÷ the layer's width.

Only the part of a layer's time that shrinks with its width counts: the time above its *floor* (the same call
cut to one output channel, timed alike). A small layer's 15-25 µs are mostly per-call overhead; charging all of
it per channel made a narrow layer's channels look dearest and emptied it (SimpleNet: 32 → 1 channel, accuracy
0.956 → 0.111). Where no timed layer's scalable part rises above noise, the layers' MACs share out their total
measured time instead (the ranking then is the global one weighted by MACs per channel); where some do, a layer
within noise is charged its MACs at the seconds per MAC of those that are not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nnopt.energy.device_energy import ActivePower, cpu_active_power
from nnopt.errors import ConfigError
from nnopt.metrics.layer_times import FLOOR_METHOD, LayerTime, layer_costs
from nnopt.metrics.layer_times import METHOD as TIMING_METHOD
from nnopt.pruning.structured.groups import ChannelGroup, weight_dim

METHOD = "estimated: active power × measured layer time on this CPU"
# A layer's time above its floor counts as signal when it is at least this share of the layer's time and
# this many seconds per model call: below either, repeated timings of one small layer differ by as much
# (SimpleNet's 64 → 64 Linear at batch 32 measured 17-31 µs in runs minutes apart on a shared 2-core VM).
NOISE_SHARE = 0.1
NOISE_S = 10e-6
# Under allocation="energy" every group keeps at least this share of its original width (and min_channels).
ENERGY_KEEP_SHARE = 1 / 8


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


def check_cpu(model: nn.Module) -> None:
    """Refuse a model off the CPU: time ranks energy only where power is the same whichever kernel runs."""
    device = next((p.device.type for p in model.parameters()), "cpu")
    if device != "cpu":
        # measured on an H200, kernels of one model drew 19-385 W above idle: time alone does not rank GPU energy
        raise ConfigError(f'allocation="energy" ranks by CPU power × measured time; this model is on {device}, '
                          "where power differs by kernel (benchmarks/results/energy.md): prune it on the CPU, or "
                          'use allocation="global"')


def measured_channel_energy(
    model: nn.Module, groups: list[ChannelGroup], inputs: Any, power: ActivePower | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-channel energy of each group (J per call on ``inputs``): active ``power`` (default: this CPU's at
    torch's threads, estimated) × the scalable part of each layer's measured time (:func:`scalable_seconds`);
    and the record of the timings (ms): ``layer_ms``, ``floor_ms``, ``scalable_ms`` and ``fallback``."""
    check_cpu(model)
    power = power or cpu_active_power(torch.get_num_threads())
    times = layer_costs(model, inputs, channel_layers(model, groups))
    seconds, fallback = scalable_seconds(times)
    costs = channel_energy_j(model, groups, {name: power.mid_w * s for name, s in seconds.items()})
    return costs, {
        "layer_ms": {name: _ms(t.seconds) for name, t in times.items()},
        "floor_ms": {name: None if t.floor_s is None else _ms(t.floor_s) for name, t in times.items()},
        "scalable_ms": {name: _ms(s) for name, s in seconds.items()},
        "fallback": fallback,
    }


def scalable_seconds(times: Mapping[str, LayerTime]) -> tuple[dict[str, float], str | None]:
    """Seconds of each layer that shrink with its width: its time less its floor (a layer without a floor:
    all of it). Layers within noise (:data:`NOISE_SHARE`, :data:`NOISE_S`) are charged by their MACs instead;
    the second value says how, None when every layer's own measurement counts."""
    above = {name: t.seconds if t.floor_s is None else max(t.seconds - t.floor_s, 0.0) for name, t in times.items()}
    signal = [n for n, s in above.items() if s >= max(NOISE_SHARE * times[n].seconds, NOISE_S)]
    noisy = [n for n in above if n not in signal]
    if not noisy:
        return above, None
    total_macs = sum(times[n].macs for n in times)
    if not signal:
        if total_macs == 0:  # nothing to share the time by: the whole layer times, as measured
            return {n: t.seconds for n, t in times.items()}, "whole layer times (within noise, no MACs counted)"
        measured = sum(t.seconds for t in times.values())
        return ({n: measured * t.macs / total_macs for n, t in times.items()},
                "MACs share of the total measured time (no layer's time above its floor was above noise)")
    signal_macs = sum(times[n].macs for n in signal)
    per_mac = sum(above[n] for n in signal) / signal_macs if signal_macs else 0.0
    for n in noisy:  # within noise: its MACs at the measured layers' seconds per MAC, never above its own time
        above[n] = min(times[n].macs * per_mac, times[n].seconds)
    return above, f"MACs × the measured layers' seconds per MAC for {', '.join(noisy)} (within noise)"


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)


def energy_floors(original: Mapping[str, int], min_channels: int) -> dict[str, int]:
    """Fewest channels each group keeps under the energy allocation: ``min_channels``, and never below
    :data:`ENERGY_KEEP_SHARE` of its original width (timing noise must not empty a layer)."""
    return {name: max(min_channels, math.ceil(ENERGY_KEEP_SHARE * size)) for name, size in original.items()}


def energy_record(power: ActivePower, inputs: str) -> dict[str, Any]:
    """What the energy-aware allocation ranked by, for the pass's details."""
    return {"method": f"{METHOD} ({power.low_w:.3g}–{power.high_w:.3g} W, the middle used; {power.source})",
            "watts": power.to_dict(), "timing": TIMING_METHOD, "inputs": inputs,
            "floor": FLOOR_METHOD,
            "channel_cost": "the energy of the layer's time above its floor × the channel's share of the layer's "
                            "width, summed over its layers",
            "min_keep": f"every group keeps at least min_channels and {ENERGY_KEEP_SHARE:.3g} of its original width"}


def per_joule(
    groups: list[ChannelGroup], ranking: dict[str, torch.Tensor], energy: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Relative importance divided by the (relative) energy one channel of its group costs."""
    mean_energy = sum(energy.get(g.name, 0.0) for g in groups) / max(len(groups), 1) or 1.0
    return {g.name: ranking[g.name] / max(energy.get(g.name, 0.0) / mean_energy, 1e-6) for g in groups}
