"""Simplification: BatchNorm folding (exact) and truncated-SVD low-rank Linears (the maths, the
rank rules, the skip rule), their save/load replay, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnopt
from nnopt.errors import ConfigError, SelectionError
from nnopt.io import save_model
from nnopt.lineage import get_lineage
from nnopt.loading import load_model
from nnopt.simplification import FoldBatchNormConfig, LowRankConfig, LowRankLinear, simplify
from nnopt.simplification.fold import find_pairs
from nnopt.simplification.lowrank import energy_rank

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


# --------------------------------------------------------------------------- helpers


def _randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.3 + 1)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


def _resnet8() -> nn.Module:
    return _randomize_norms(nnopt.create_model("resnet8", seed=0))


def _norm_count(model: nn.Module) -> int:
    return sum(isinstance(m, NORMS) for m in model.modules())


def _details(model: nn.Module) -> dict:
    return get_lineage(model).applied[-1].details


class ConvBNReLU(nn.Module):
    """A conv with a bias, a conv without one, an affine=False BatchNorm, and a BatchNorm whose conv
    output is also read by a skip connection (so it must not fold)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, groups=2)
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        return self.relu(self.bn3(y)) + y  # conv3's output is read twice


# --------------------------------------------------------------------------- folding


def test_fold_resnet8_is_exact_and_removes_every_batchnorm():
    model = _resnet8()
    assert _norm_count(model) == 6
    folded = simplify(model, FoldBatchNormConfig())
    assert _norm_count(folded) == 0 and _norm_count(model) == 6  # a copy; the original is untouched
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    details = _details(folded)
    assert details["method"] == "torch.fx" and details["skipped"] == {}
    assert details["folded"]["stem.0.1"] == "stem.0.0"
    assert folded.stem[0][0].bias is not None  # the bias-free conv received the folded bias


def test_fold_tiny_model_exact_and_skips_a_shared_output():
    model = _randomize_norms(ConvBNReLU())
    folded = simplify(model, FoldBatchNormConfig())
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn3, nn.BatchNorm2d)  # conv3's output also feeds the addition
    assert "also read elsewhere" in find_pairs(model).skipped["bn3"]
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_matches_torch_reference_and_linear_needs_2d_output():
    model = _randomize_norms(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()))
    # Without an example input the Linear's output rank is unknown: nothing folds.
    assert type(simplify(model, FoldBatchNormConfig())[1]) is nn.BatchNorm1d
    assert "output shape is unknown" in find_pairs(model).skipped["1"]
    x = torch.randn(7, 6)
    folded = simplify(model, FoldBatchNormConfig(), data=x)
    assert isinstance(folded[1], nn.Identity)
    reference = torch.nn.utils.fusion.fuse_linear_bn_eval(model[0], model[1])
    torch.testing.assert_close(folded[0].weight, reference.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(folded[0].bias, reference.bias, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_save_load_round_trip(tmp_path):
    folded = simplify(_resnet8(), FoldBatchNormConfig())
    save_model(folded, tmp_path / "folded")
    loaded = load_model(tmp_path / "folded")
    assert _norm_count(loaded) == 0
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded.eval()(x))


# --------------------------------------------------------------------------- low rank


def _linear(out: int, inp: int, rank: int | None = None, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        if rank is None:
            layer.weight.copy_(torch.randn(out, inp, generator=g))
        else:
            layer.weight.copy_(torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g))
        layer.bias.copy_(torch.randn(out, generator=g))
    return layer


def _two_layer(first: nn.Linear) -> nn.Sequential:
    return nn.Sequential(first, nn.ReLU(), nn.Linear(first.out_features, 3))


def test_energy_one_reproduces_a_rank_deficient_layer():
    model = _two_layer(_linear(48, 40, rank=6))
    low = simplify(model, LowRankConfig(energy=1.0))
    assert isinstance(low[0], LowRankLinear) and low[0].rank == 6
    assert isinstance(low[2], nn.Linear)  # the default leaves the last Linear (classifier) alone
    x = torch.randn(10, 40)
    with torch.no_grad():
        torch.testing.assert_close(low(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(low[0].weight_product(), model[0].weight, atol=1e-4, rtol=1e-4)


def test_chosen_rank_shapes_and_parameter_count():
    model = _two_layer(_linear(96, 64))
    low = simplify(model, LowRankConfig(energy=None, rank=16, layers=("0",)))
    layer = low[0]
    assert tuple(layer.down.weight.shape) == (16, 64) and layer.down.bias is None
    assert tuple(layer.up.weight.shape) == (96, 16) and tuple(layer.up.bias.shape) == (96,)
    assert sum(p.numel() for p in layer.parameters()) == 16 * (64 + 96) + 96
    assert torch.equal(layer.up.bias, model[0].bias)


def test_energy_rule_picks_the_smallest_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert energy_rank(s, 16 / 22) == 1
    assert energy_rank(s, 16 / 22 + 1e-6) == 2
    assert energy_rank(s, 20 / 22) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 4
    # And through the pass: the retained share is at least the target, and one rank less is below it.
    layer = _linear(64, 80, seed=4)
    sv = torch.linalg.svdvals(layer.weight.detach().double())
    share = torch.cumsum(sv**2, 0) / (sv**2).sum()
    low = simplify(_two_layer(layer), LowRankConfig(energy=0.3))[0]
    assert share[low.rank - 1] >= 0.3 > share[low.rank - 2]


def test_frobenius_error_is_the_tail_energy():
    layer = _linear(50, 70, seed=5)
    rank = 12
    low = simplify(_two_layer(layer), LowRankConfig(energy=None, rank=rank))[0]
    sv = torch.linalg.svdvals(layer.weight.detach().double())
    error = ((layer.weight - low.weight_product()).double() ** 2).sum()
    torch.testing.assert_close(error, (sv[rank:] ** 2).sum(), rtol=1e-4, atol=1e-4)


def test_skip_rule_leaves_layers_without_saving():
    model = nnopt.create_model("lenet300", seed=0)  # features.0 is 64→300, features.2 is 300→100
    # rank 60: 64→300 costs 60·364 = 21840 >= 64·300 = 19200 (skip); 300→100 costs 60·400 < 30000 (factorize).
    low = simplify(model, LowRankConfig(energy=None, rank=60))
    details = _details(low)
    assert set(details["layers"]) == {"features.2"} and details["layers"]["features.2"]["rank"] == 60
    assert "no saving" in details["skipped"]["features.0"]
    assert type(low.features[0]) is nn.Linear and isinstance(low.features[2], LowRankLinear)


def test_lowrank_save_load_round_trip(tmp_path):
    model = nnopt.create_model("lenet300", seed=0)
    low = simplify(model, LowRankConfig(energy=0.5))
    details = _details(low)
    assert details["layers"], details
    save_model(low, tmp_path / "low")
    loaded = load_model(tmp_path / "low")
    for name, info in details["layers"].items():
        assert loaded.get_submodule(name).rank == info["rank"]
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), low.eval()(x))


def test_fold_then_lowrank_replay_in_order(tmp_path):
    model = simplify(simplify(_resnet8(), FoldBatchNormConfig()), LowRankConfig(energy=None, rank=2,
                                                                                   layers=("classifier",)))
    save_model(model, tmp_path / "both")
    loaded = load_model(tmp_path / "both")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({"energy": None, "rank": 0}, "rank"),
        ({"energy": 0.9, "rank": 8}, "energy/rank"),
        ({"rank": -2}, "rank"),
        ({"layers": ("re:(",)}, "pattern"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    assert LowRankConfig().retained_energy == 0.9 and LowRankConfig(rank=8).retained_energy is None
    with pytest.raises(ConfigError, match=field):
        LowRankConfig(**kwargs)


def test_bad_selection_and_wrong_config_type():
    model = nnopt.create_model("lenet300", seed=0)
    with pytest.raises(SelectionError, match="nope"):
        simplify(model, LowRankConfig(layers=("nope",)))
    with pytest.raises(SelectionError, match="no nn.Linear"):
        simplify(model, LowRankConfig(layers=("type:ReLU",)))
    with pytest.raises(SelectionError, match="classifier"):
        simplify(nn.Sequential(nn.Linear(4, 2)), LowRankConfig())
    with pytest.raises(ConfigError, match="not a simplify config"):
        simplify(model, nnopt.TrainConfig())
    assert LowRankConfig.from_dict(LowRankConfig(energy=None, rank=4).to_dict()) == LowRankConfig(energy=None, rank=4)


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: folding falls back to nn.Sequential neighbours."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.head(y) if float(y.sum()) > -1e9 else y


def test_fold_falls_back_to_sequential_neighbours_when_untraceable():
    model = _randomize_norms(Untraceable())
    plan = find_pairs(model)
    assert plan.method == "nn.Sequential" and plan.pairs == {"body.1": "body.0"}
    assert "could not trace" in plan.skipped["head"]
    folded = simplify(model, FoldBatchNormConfig())
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
