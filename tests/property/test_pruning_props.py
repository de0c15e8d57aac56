"""Property-based tests of pruning: random widths, ratios, thresholds and N:M patterns.

Each property is what a pruning config promises in its docstring, checked against an independent
computation on the weights before and after (never against numbers copied from a run):

- threshold: exactly the weights with |w| < θ become 0; everything else is bit-identical;
- magnitude: the target sparsity is met to within one weight, per layer (uniform) and overall
  (global, LAMP), and no dropped weight is larger than a kept one it competed with;
- N:M: every group of M consecutive input weights keeps at most N non-zeros, the N largest;
- masks survive fine-tuning (MaskKeeper), while plain training would revive them;
- structured pruning: the physically smaller model computes what its masked twin computes,
  removes ``ratio`` of each group's channels (within half a channel) and keeps ``min_channels``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nnopt
from nnopt.data import Split
from nnopt.errors import ConfigError
from nnopt.pruning import MagnitudePruneConfig, MaskKeeper, NMPruneConfig, StructuredPruneConfig, ThresholdPruneConfig
from nnopt.pruning.nm import nm_mask
from nnopt.pruning.structured.groups import channel_groups
from nnopt.pruning.structured.surgery import mask_channels
from nnopt.training import TrainConfig

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=20)

WIDTHS = st.lists(st.integers(1, 20), min_size=1, max_size=3)
SPARSITY = st.floats(0.0, 0.99, allow_nan=False) | st.sampled_from([0.0, 0.5, 0.9, 0.99])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _mlp(hidden: list[int], seed: int, in_features: int = 10, classes: int = 3,
         values: str = "normal") -> nn.Module:
    """An nnopt SimpleNet-style MLP with the given widths; ``values="integers"`` makes ties."""
    model = nnopt.create_model("simplenet", in_features=in_features, hidden=tuple(hidden), num_classes=classes,
                               seed=seed)
    if values == "integers":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    signs = torch.where(torch.rand(m.weight.shape, generator=g) < 0.5, -1.0, 1.0)
                    m.weight.copy_(signs * torch.randint(1, 4, m.weight.shape, generator=g))
    return model


def _targets(model: nn.Module) -> list[str]:
    """Default pruning targets: every Linear/Conv2d but the last one (the classifier)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][:-1]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _untouched_except(before: dict[str, torch.Tensor], after: nn.Module, weights: list[str]) -> None:
    """Every tensor but the named layers' weights is bit-identical (biases, classifier)."""
    for key, value in after.state_dict().items():
        if key.removesuffix(".weight") in weights and key.endswith(".weight"):
            continue
        assert torch.equal(value, before[key]), key


# -------------------------------------------------------------------------- threshold


@FAST
@given(hidden=WIDTHS, seed=st.integers(0, 10**6), q=st.floats(0.0, 1.0), at_a_weight=st.booleans(),
       values=st.sampled_from(["normal", "integers"]))
def test_threshold_zeros_exactly_the_small_weights(hidden, seed, q, at_a_weight, values):
    model = _mlp(hidden, seed, values=values)
    before = _state(model)
    names = _targets(model)
    magnitudes = torch.cat([before[f"{n}.weight"].abs().flatten() for n in names])
    # θ equal to an existing |w| checks the strict "<"; otherwise any value in the weights' range.
    theta = float(torch.quantile(magnitudes, q)) if not at_a_weight else float(
        magnitudes[int(q * (magnitudes.numel() - 1))])
    pruned = nnopt.prune(model, ThresholdPruneConfig(threshold=theta))
    for name in names:
        w, new = before[f"{name}.weight"], pruned.get_submodule(name).weight.detach()
        small = w.abs() < theta
        assert bool((new[small] == 0).all()), name
        assert torch.equal(_bits(new[~small]), _bits(w[~small])), name
    _untouched_except(before, pruned, names)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is a copy


# -------------------------------------------------------------------------- magnitude


@FAST
@given(hidden=WIDTHS, seed=st.integers(0, 10**6), sparsity=SPARSITY,
       allocation=st.sampled_from(["uniform", "global", "lamp"]), values=st.sampled_from(["normal", "integers"]))
def test_magnitude_reaches_the_target_within_one_weight(hidden, seed, sparsity, allocation, values):
    model = _mlp(hidden, seed, values=values)
    before = _state(model)
    names = _targets(model)
    pruned = nnopt.prune(model, MagnitudePruneConfig(sparsity=sparsity, allocation=allocation))
    old = {n: before[f"{n}.weight"] for n in names}
    new = {n: pruned.get_submodule(n).weight.detach() for n in names}
    # The weights were all non-zero, so each zero now is a dropped weight; kept ones are untouched.
    dropped = {n: new[n] == 0 for n in names}
    for n in names:
        assert torch.equal(_bits(new[n][~dropped[n]]), _bits(old[n][~dropped[n]])), n
    _untouched_except(before, pruned, names)

    total = sum(w.numel() for w in old.values())
    zeros = sum(int(d.sum()) for d in dropped.values())
    assert abs(zeros - sparsity * total) <= 1, (zeros, sparsity * total)

    def dropped_not_larger(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        gone = torch.cat([w.abs()[d] for w, d in pairs])
        kept = torch.cat([w.abs()[~d] for w, d in pairs])
        if gone.numel() and kept.numel():
            assert float(gone.max()) <= float(kept.min())

    if allocation == "uniform":
        for n in names:
            assert abs(int(dropped[n].sum()) - sparsity * old[n].numel()) <= 1, n
            dropped_not_larger([(old[n], dropped[n])])
    elif allocation == "global":
        dropped_not_larger([(old[n], dropped[n]) for n in names])
    else:  # LAMP: within a layer, smaller weights go first; no layer is emptied while others can give
        for n in names:
            dropped_not_larger([(old[n], dropped[n])])
        if round(sparsity * total) <= total - len(names):
            assert all(bool((~dropped[n]).any()) for n in names)


# -------------------------------------------------------------------------- N:M


@st.composite
def nm_models(draw: st.DrawFn) -> tuple[nn.Module, int, int]:
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    seed = draw(st.integers(0, 10**6))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        c_in, c_mid = m * draw(st.integers(1, 3)), m * draw(st.integers(1, 3))
        k = draw(st.integers(1, 3))
        model = nn.Sequential(nn.Conv2d(c_in, c_mid, k), nn.ReLU(), nn.Conv2d(c_mid, 4, k, padding=k // 2),
                              nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        model(torch.zeros(1, c_in, 6, 6))  # materialize the lazy classifier
    else:
        widths = [m * draw(st.integers(1, 4)) for _ in range(draw(st.integers(2, 4)))]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(widths[-1], 3))
    if draw(st.booleans()):  # ties and exact zeros in the weights
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-2, 3, p.shape).to(p.dtype))
    return model, n, m


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """(…, m) groups of consecutive input weights (input channels at each kernel position)."""
    if weight.ndim == 4:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(-1, m)


@FAST
@given(case=nm_models())
def test_nm_pattern_holds_in_every_group(case):
    model, n, m = case
    before = _state(model)
    names = _targets(model)
    pruned = nnopt.prune(model, NMPruneConfig(n=n, m=m))
    for name in names:
        old, new = before[f"{name}.weight"], pruned.get_submodule(name).weight.detach()
        g_old, g_new = _groups(old, m), _groups(new, m)
        kept = g_new != 0
        assert bool((kept.sum(dim=1) <= n).all()), name
        assert torch.equal(g_new[kept], g_old[kept])  # survivors are untouched
        # The kept weights are the n largest of the group: nothing dropped is larger than a survivor,
        # and every non-zero that was dropped lost to n survivors at least as large.
        mask = nm_mask(old, n, m, name)
        assert torch.equal(mask.sum(), torch.tensor(old.numel() // m * n))
        g_mask = _groups(mask, m)
        assert bool((g_mask.sum(dim=1) == n).all())
        assert torch.equal(g_new, torch.where(g_mask, g_old, torch.zeros((), dtype=old.dtype)))
        kept_min = torch.where(g_mask, g_old.abs(), torch.full_like(g_old, math.inf)).min(dim=1).values
        dropped_max = torch.where(~g_mask, g_old.abs(), torch.full_like(g_old, -math.inf)).max(dim=1).values
        assert bool((dropped_max <= kept_min).all()), name
    _untouched_except(before, pruned, names)


@FAST
@given(m=st.integers(3, 8), extra=st.integers(1, 2), seed=st.integers(0, 1000))
def test_nm_with_m_not_dividing_the_fan_in_changes_nothing(m, extra, seed):
    torch.manual_seed(seed)
    # The first layer fits the pattern; the second's fan-in m + extra does not.
    bad = nn.Sequential(nn.Linear(m * 2, m + extra), nn.ReLU(), nn.Linear(m + extra, 4), nn.ReLU(), nn.Linear(4, 2))
    before = _state(bad)
    with pytest.raises(ConfigError, match="does not divide"):  # selected explicitly: an error
        nnopt.prune(bad, NMPruneConfig(n=1, m=m, layers=("0", "2")), inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in bad.state_dict().items())  # a bad layer changes nothing
    # By default the layer that cannot hold the pattern stays dense; the one that can gets it.
    pruned = nnopt.prune(bad, NMPruneConfig(n=1, m=m))
    assert torch.equal(pruned[2].weight, bad[2].weight)
    assert bool(((pruned[0].weight.reshape(-1, m) != 0).sum(1) <= 1).all())


# -------------------------------------------------------------------------- masks through fine-tuning


@settings(SLOW, max_examples=10)
@given(hidden=st.lists(st.integers(4, 16), min_size=1, max_size=2), seed=st.integers(0, 10**6),
       sparsity=st.sampled_from([0.3, 0.6, 0.9]), kind=st.sampled_from(["magnitude", "nm"]))
def test_masks_survive_fine_tuning(hidden, seed, sparsity, kind):
    g = torch.Generator().manual_seed(seed)
    data = Split(torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g))
    model = _mlp([4 * math.ceil(h / 4) for h in hidden], seed, in_features=8)
    config = MagnitudePruneConfig(sparsity=sparsity) if kind == "magnitude" else NMPruneConfig(n=2, m=4)
    pruned = nnopt.prune(model, config)
    names = _targets(pruned)
    zeros = {n: pruned.get_submodule(n).weight.detach() == 0 for n in names}
    assert any(bool(z.any()) for z in zeros.values())
    start = _state(pruned)

    plain = copy.deepcopy(pruned)  # the control: Adam revives pruned weights without a MaskKeeper
    nnopt.train(plain, data, TrainConfig(epochs=1, batch_size=16, lr=1e-2, seed=seed), progress=False)
    assert any(bool((plain.get_submodule(n).weight.detach()[zeros[n]] != 0).any()) for n in names)

    nnopt.finetune(pruned, data, TrainConfig(epochs=1, batch_size=16, lr=1e-2, seed=seed), progress=False)
    for n in names:
        w = pruned.get_submodule(n).weight.detach()
        assert bool((w[zeros[n]] == 0).all()), n
        assert not bool((_bits(w[zeros[n]]) != 0).any()), n  # +0.0, not -0.0
    moved = [not torch.equal(pruned.get_submodule(n).weight[~zeros[n]], start[f"{n}.weight"][~zeros[n]])
             for n in names]
    assert any(moved)  # the step did train the kept weights


@FAST
@given(shape=st.sampled_from([(6, 4), (3, 5), (4, 2, 3, 3)]), seed=st.integers(0, 1000),
       steps=st.integers(1, 3))
def test_mask_keeper_reapplies_given_masks(shape, seed, steps):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2])
    model = nn.Sequential(layer)
    keep = torch.rand(shape, generator=g) < 0.5
    keeper = MaskKeeper({"0": keep})
    for _ in range(steps):
        with torch.no_grad():
            layer.weight.add_(torch.randn(shape, generator=g))  # any update, like an optimizer step
        keeper.after_step(model)
        assert bool((layer.weight[~keep] == 0).all())
        assert not bool((_bits(layer.weight[~keep]) != 0).any())


# -------------------------------------------------------------------------- structured


@st.composite
def structured_cases(draw: st.DrawFn) -> tuple[nn.Module, Split | None, list[str]]:
    """A random-width MLP: nnopt's own (traced through input_shape) or a plain nn.Sequential, maybe with
    BatchNorm1d; returns the model, data for tracing (Sequential only) and the hidden layers' names."""
    hidden = draw(st.lists(st.integers(1, 16), min_size=1, max_size=3))
    in_features, classes = draw(st.integers(1, 12)), draw(st.integers(2, 5))
    seed = draw(st.integers(0, 10**6))
    if draw(st.booleans()):
        model = _mlp(hidden, seed, in_features=in_features, classes=classes)
        return model.eval(), None, [f"features.{2 * i}" for i in range(len(hidden))]
    torch.manual_seed(seed)
    norm, bias = draw(st.booleans()), draw(st.booleans())
    layers: list[nn.Module] = []
    names = []
    widths = [in_features, *hidden]
    for a, b in zip(widths[:-1], widths[1:]):
        names.append(str(len(layers)))
        layers.append(nn.Linear(a, b, bias=bias))
        if norm:
            bn = nn.BatchNorm1d(b)
            with torch.no_grad():  # non-trivial statistics, so that slicing them is really checked
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
            layers.append(bn)
        layers.append(nn.ReLU())
    model = nn.Sequential(*layers, nn.Linear(widths[-1], classes)).eval()
    g = torch.Generator().manual_seed(seed)
    data = Split(torch.randn(8, in_features, generator=g), torch.randint(0, classes, (8,), generator=g))
    return model, data, names


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor, keep_in: torch.Tensor) -> torch.Tensor:
    """Indices of ``original``'s rows that ``pruned`` kept, in order (rows are matched on the kept columns)."""
    rows = original[:, keep_in]
    kept, start = [], 0
    for row in pruned:
        while not torch.equal(rows[start], row):
            start += 1
        kept.append(start)
        start += 1
    return torch.tensor(kept, dtype=torch.int64)


@SLOW
@given(case=structured_cases(), ratio=st.floats(0.0, 0.95), importance=st.sampled_from(["l1", "random"]),
       allocation=st.sampled_from(["uniform", "global"]), min_channels=st.integers(1, 4), seed=st.integers(0, 99))
def test_structured_pruning_equals_its_masked_twin(case, ratio, importance, allocation, min_channels, seed):
    model, data, names = case
    config = StructuredPruneConfig(ratio=ratio, importance=importance, allocation=allocation,
                                   min_channels=min_channels, seed=seed)
    pruned = nnopt.prune(model, config, data=data).eval()
    x = torch.randn(16, model.get_submodule(names[0]).in_features, generator=torch.Generator().manual_seed(seed))

    # Recover which channels went (rows of each hidden layer, matched in order), then mask the same
    # channels in a copy of the original: the two must compute the same function.
    groups = [g for g in channel_groups(model, x[:2]) if g.prunable]
    by_layer = {next(m.module for m in g.members if m.role == "out"): g for g in groups}
    assert sorted(by_layer) == sorted(names)
    removed, keep_in = {}, torch.arange(model.get_submodule(names[0]).in_features)
    sizes = {}
    for name in names:
        original, physical = model.get_submodule(name), pruned.get_submodule(name)
        keep = _kept_rows(original.weight.detach(), physical.weight.detach(), keep_in)
        gone = torch.ones(original.out_features, dtype=torch.bool)
        gone[keep] = False
        removed[by_layer[name].name] = gone.nonzero().flatten()
        sizes[name] = (original.out_features, physical.out_features)
        if original.bias is not None:
            assert torch.equal(physical.bias, original.bias[keep])
        keep_in = keep
    masked = copy.deepcopy(model)
    mask_channels(masked, groups, removed)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked.eval()(x), atol=1e-5, rtol=1e-5)

    # The classifier's outputs stay; no hidden layer drops below min_channels (or its own width).
    last = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    for name, (before, after) in sizes.items():
        assert after >= min(min_channels, before), (name, before, after)
    # The amount removed: ratio of each group (uniform) or of all channels (global), within half a
    # channel, unless min_channels stops it first.
    def check_amount(before: int, after: int, floor: int) -> None:
        cap = max(0, before - floor)
        gone = before - after
        assert gone <= cap
        if gone < cap:
            assert abs(gone - ratio * before) <= 0.5 + 1e-9, (before, after, ratio)
        else:
            assert ratio * before >= cap - 0.5 - 1e-9, (before, after, ratio)

    if allocation == "uniform":
        for before, after in sizes.values():
            check_amount(before, after, min_channels)
    else:
        total_before = sum(b for b, _ in sizes.values())
        total_after = sum(a for _, a in sizes.values())
        cap = sum(max(0, b - min_channels) for b, _ in sizes.values())
        gone = total_before - total_after
        assert gone <= cap
        if gone < cap:
            assert abs(gone - ratio * total_before) <= 0.5 + 1e-9
    assert sum(p.numel() for p in pruned.parameters()) <= sum(p.numel() for p in model.parameters())
