"""Energy-aware allocation of structured pruning: a channel's cost is active power × the measured time of the
layers it lives in (nnopt.metrics.layer_times), so a slow layer's channels cost more and go first.

Timings are controlled, never compared between close kernels: a layer is made slow by a forward pre-hook
that sleeps (a sleep never returns early), or the timing function is replaced."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import nnopt
import nnopt.pruning.structured.energy as energy_module
from nnopt.energy.device_energy import ActivePower, cpu_active_power
from nnopt.metrics.layer_times import layer_times
from nnopt.pruning.structured import StructuredPruneConfig, channel_energy_j
from nnopt.pruning.structured.energy import METHOD, measured_channel_energy
from nnopt.pruning.structured.groups import channel_groups

SLEEP_S = 0.03  # far above what a 16 → 32 Linear takes at batch 32 on any CPU (microseconds)


class Twins(nn.Module):
    """Two identical branches (same weights, so the same importance) summed at the output."""

    input_shape = (16,)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fast, self.slow = nn.Linear(16, 32), nn.Linear(16, 32)
        self.head_fast, self.head_slow = nn.Linear(32, 4), nn.Linear(32, 4)
        self.slow.load_state_dict(self.fast.state_dict())
        self.head_slow.load_state_dict(self.head_fast.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_fast(torch.relu(self.fast(x))) + self.head_slow(torch.relu(self.slow(x)))


def _sleep(*_: object) -> None:
    time.sleep(SLEEP_S)


def _slowed(model: nn.Module, name: str) -> nn.Module:
    model.get_submodule(name).register_forward_pre_hook(_sleep)
    return model


def _groups(model: nn.Module) -> dict[str, object]:
    groups = [g for g in channel_groups(model, torch.zeros(2, 16)) if g.prunable]
    return {next(m.module for m in g.members if m.role == "out"): g for g in groups}


def _lost(pruned: nn.Module) -> dict[str, int]:
    groups = pruned._nnopt_lineage.applied[-1].details["groups"]
    return {name: g["before"] - g["after"] for name, g in groups.items()}


def test_a_slow_layer_costs_more_per_channel_and_loses_more_channels():
    model = _slowed(Twins().eval(), "slow")
    groups = _groups(model)
    assert set(groups) == {"fast", "slow"}
    costs, layer_ms = measured_channel_energy(model, list(groups.values()), torch.randn(32, 16))
    assert layer_ms["slow"] >= SLEEP_S * 1e3 and layer_ms["slow"] > layer_ms["fast"]
    assert costs[groups["slow"].name] > costs[groups["fast"].name] > 0
    lost = {}
    for allocation in ("global", "energy"):
        pruned = nnopt.prune(model, StructuredPruneConfig(ratio=0.5, importance="l1", allocation=allocation))
        lost[allocation] = _lost(pruned)
        assert sum(lost[allocation].values()) == 32  # the same share of all channels either way
    by_name = {groups[layer].name: layer for layer in groups}
    energy = {by_name[name]: n for name, n in lost["energy"].items()}
    plain = {by_name[name]: n for name, n in lost["global"].items()}
    assert plain["slow"] == plain["fast"]  # twins: equal importance, equal cuts without energy
    assert energy["slow"] > energy["fast"] and energy["slow"] > plain["slow"]
    details = pruned._nnopt_lineage.applied[-1].details
    assert details["energy_allocation"]["method"].startswith(METHOD)
    assert details["rounds"][0]["layer_ms"]["slow"] >= SLEEP_S * 1e3


def test_channel_cost_is_active_power_times_measured_time(monkeypatch):
    seconds = {"fast": 1e-3, "slow": 3e-3, "head_fast": 0.0, "head_slow": 0.0}
    monkeypatch.setattr(energy_module, "layer_times", lambda model, inputs, names: {n: seconds[n] for n in names})
    model = Twins().eval()
    groups = _groups(model)
    at = {}
    for watts in (4.0, 40.0):  # equal power for both layers, at two levels
        power = ActivePower(watts / 2, watts * 1.5, "test")
        costs, layer_ms = measured_channel_energy(model, list(groups.values()), torch.zeros(1, 16), power)
        assert layer_ms == pytest.approx({n: s * 1e3 for n, s in seconds.items()})
        for layer in ("fast", "slow"):  # one of 32 output rows: the layer's joules ÷ 32
            assert costs[groups[layer].name] == pytest.approx(power.mid_w * seconds[layer] / 32)
        at[watts] = costs[groups["slow"].name] / costs[groups["fast"].name]
    assert at[4.0] == pytest.approx(3.0) and at[40.0] == pytest.approx(3.0)  # the ratio of the times
    default, _ = measured_channel_energy(model, list(groups.values()), torch.zeros(1, 16))
    mid_w = cpu_active_power(torch.get_num_threads()).mid_w
    assert default[groups["fast"].name] == pytest.approx(mid_w * 1e-3 / 32)
    assert channel_energy_j(model, list(groups.values()), {}) == {g.name: 0.0 for g in groups.values()}


def test_layer_times_counts_repeated_calls_and_leaves_out_uncalled_layers():
    class Repeats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.once, self.twice, self.unused = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.twice(self.twice(self.once(x)))

    model = Repeats().train()
    for name in ("once", "twice"):
        _slowed(model, name)
    started = time.perf_counter()
    seconds = layer_times(model, torch.zeros(4, 8), ["once", "twice", "unused"], budget_s=0.1)
    assert time.perf_counter() - started < 2.0
    assert set(seconds) == {"once", "twice"}
    assert seconds["once"] >= SLEEP_S and seconds["twice"] >= 2 * SLEEP_S
    assert model.training  # put back as it was


def test_energy_allocation_times_once_per_round(monkeypatch, digits):
    calls = []

    def fake(model, inputs, names):
        calls.append(inputs)
        return {n: 1e-3 for n in names}

    monkeypatch.setattr(energy_module, "layer_times", fake)
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.prune(model, StructuredPruneConfig(ratio=0.5, importance="l1", allocation="energy", rounds=2),
                data=digits.train)
    assert len(calls) == 2 and calls[0].shape == (32, *digits.train.x.shape[1:])  # one mini-batch of the data
    calls.clear()
    pruned = nnopt.prune(model, StructuredPruneConfig(importance="l1", allocation="energy", target_mac_reduction=2.0))
    assert len(calls) == 1  # the bisection over ratios reuses the one measurement
    record = pruned._nnopt_lineage.applied[-1].details["energy_allocation"]
    assert record["inputs"] == "32 random rows of the model's input" and record["watts"]["measured"] is False


def test_energy_allocation_refuses_a_model_off_the_cpu():
    """On a GPU power differs by kernel (recorded H200: 19-385 W), so time alone cannot rank its energy."""
    from nnopt.errors import ConfigError

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to("meta")
    with pytest.raises(ConfigError, match='allocation="energy" ranks by CPU power'):
        measured_channel_energy(model, [], torch.zeros(1, 4, device="meta"))
