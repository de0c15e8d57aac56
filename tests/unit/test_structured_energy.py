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
from nnopt.metrics.layer_times import LayerTime, layer_costs, layer_times
from nnopt.pruning.structured import StructuredPruneConfig, channel_energy_j
from nnopt.pruning.structured.energy import METHOD, measured_channel_energy, scalable_seconds
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


def _fixed(seconds: dict[str, float], floors: dict[str, float] | None = None, macs: dict[str, int] | None = None):
    """A stand-in for layer_costs with the given times (floors 0 s, 1 MAC unless given)."""
    def fake(model: nn.Module, inputs: object, names: list[str]) -> dict[str, LayerTime]:
        return {n: LayerTime(seconds[n], (floors or {}).get(n, 0.0), (macs or {}).get(n, 1)) for n in names}
    return fake


def _lost(pruned: nn.Module) -> dict[str, int]:
    groups = pruned._nnopt_lineage.applied[-1].details["groups"]
    return {name: g["before"] - g["after"] for name, g in groups.items()}


def test_a_slow_layer_costs_more_per_channel_and_loses_more_channels():
    model = _slowed(Twins().eval(), "slow")
    groups = _groups(model)
    assert set(groups) == {"fast", "slow"}
    costs, record = measured_channel_energy(model, list(groups.values()), torch.randn(32, 16))
    layer_ms = record["layer_ms"]
    assert layer_ms["slow"] >= SLEEP_S * 1e3 and layer_ms["slow"] > layer_ms["fast"]
    assert record["scalable_ms"]["slow"] >= SLEEP_S * 1e3 * 0.9  # the sleep is in the layer, not in its floor
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
    monkeypatch.setattr(energy_module, "layer_costs", _fixed(seconds))
    model = Twins().eval()
    groups = _groups(model)
    at = {}
    for watts in (4.0, 40.0):  # equal power for both layers, at two levels
        power = ActivePower(watts / 2, watts * 1.5, "test")
        costs, record = measured_channel_energy(model, list(groups.values()), torch.zeros(1, 16), power)
        assert record["layer_ms"] == pytest.approx({n: s * 1e3 for n, s in seconds.items()})
        assert record["scalable_ms"] == record["layer_ms"]  # floors of 0 s (the heads, at 0 s, stay at 0)
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
        return {n: LayerTime(1e-3, 0.0, 1) for n in names}

    monkeypatch.setattr(energy_module, "layer_costs", fake)
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


def test_energy_refusal_off_the_cpu_comes_before_any_scoring(monkeypatch):
    import nnopt.pruning.structured as structured
    from nnopt.errors import ConfigError

    def never(*_: object) -> None:
        raise AssertionError("scored a model the energy allocation refuses")

    monkeypatch.setattr(structured, "score", never)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to("meta")
    with pytest.raises(ConfigError, match='allocation="energy" ranks by CPU power'):
        nnopt.prune(model, StructuredPruneConfig(ratio=0.5, importance="l1", allocation="energy"))


def test_layer_costs_time_a_one_channel_floor_and_restore_each_modules_mode():
    frozen = nn.BatchNorm1d(8)
    conv = nn.Conv1d(1, 6, 3, padding=1, padding_mode="circular")
    model = nn.Sequential(nn.Linear(4, 8), frozen, nn.Unflatten(1, (1, 8)), conv).train()
    frozen.eval()  # a frozen norm inside a model being trained
    conv.register_forward_pre_hook(_sleep)  # slow in the layer's own call, not in its twin
    times = layer_costs(model, torch.randn(16, 4), ["0", "3"], budget_s=0.1)
    assert times["0"].macs == 16 * 4 * 8 and times["3"].macs == 16 * 6 * 8 * 3
    assert times["3"].floor_s is not None and times["3"].seconds - times["3"].floor_s >= SLEEP_S * 0.9
    assert 0 < times["0"].floor_s < SLEEP_S
    assert model.training and model[0].training and not frozen.training  # each module's own flag put back


def test_scalable_time_is_what_lies_above_the_floor_else_the_macs_share():
    fast = {"a": LayerTime(400e-6, 100e-6, 1000), "b": LayerTime(120e-6, 100e-6, 1000)}
    seconds, fallback = scalable_seconds(fast)
    assert seconds["a"] == pytest.approx(300e-6)  # above noise: the measured part
    assert seconds["b"] == pytest.approx(20e-6) and fallback is None  # 20 µs: above 10 % and above 10 µs
    mixed = {"a": LayerTime(400e-6, 100e-6, 1000), "b": LayerTime(21e-6, 20e-6, 10)}
    seconds, fallback = scalable_seconds(mixed)
    assert seconds["b"] == pytest.approx(3e-6) and "b" in fallback  # 10 MACs at a's 0.3 µs per MAC
    overhead = {"a": LayerTime(30e-6, 29e-6, 3000), "b": LayerTime(20e-6, 21e-6, 1000)}
    seconds, fallback = scalable_seconds(overhead)
    assert seconds == pytest.approx({"a": 37.5e-6, "b": 12.5e-6}) and fallback.startswith("MACs share")


def test_overhead_bound_layers_keep_their_width_and_accuracy(monkeypatch, trained_simplenet, digits):
    # Regression: SimpleNet's layers take ~15-30 µs at batch 32, nearly all per-call overhead; charging all of
    # it per channel cut features.2 from 32 channels to 1 (accuracy 0.956 → 0.111). Times fixed as measured.
    widths = {"features.0": (64, 64), "features.2": (64, 32), "classifier": (32, 10)}
    seconds = {"features.0": 30e-6, "features.2": 28e-6, "classifier": 25e-6}
    floors = {"features.0": 27e-6, "features.2": 26e-6, "classifier": 25e-6}
    macs = {name: 32 * i * o for name, (i, o) in widths.items()}
    monkeypatch.setattr(energy_module, "layer_costs", _fixed(seconds, floors, macs))
    accuracy = {}
    for allocation in ("global", "energy"):
        pruned = nnopt.prune(trained_simplenet, StructuredPruneConfig(ratio=0.5, importance="l1",
                                                                      allocation=allocation))
        with torch.no_grad():
            accuracy[allocation] = float((pruned(digits.test.x).argmax(-1) == digits.test.y).float().mean())
    details = pruned._nnopt_lineage.applied[-1].details
    assert details["rounds"][0]["fallback"].startswith("MACs share")
    assert details["rounds"][0]["floor_ms"]["features.0"] == pytest.approx(0.027)
    for g in details["groups"].values():
        assert g["after"] >= g["before"] / 8
    assert accuracy["energy"] >= accuracy["global"] - 0.1, accuracy


def test_energy_allocation_never_cuts_a_group_below_an_eighth(monkeypatch):
    # one layer's measured time dwarfs the other's: its group stops at 1/8 of its width, however cheap to keep
    monkeypatch.setattr(energy_module, "layer_costs", _fixed({"fast": 1e-6, "slow": 1.0, "head_fast": 0.0,
                                                              "head_slow": 0.0}))
    pruned = nnopt.prune(Twins().eval(), StructuredPruneConfig(ratio=0.6, importance="l1", allocation="energy"))
    assert sorted(g["after"] for g in pruned._nnopt_lineage.applied[-1].details["groups"].values()) == [4, 22]
