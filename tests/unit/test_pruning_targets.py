"""Sparsity targets, allocations, N:M patterns, masks and the gradual schedule."""

import pytest
import torch
from torch import nn

import nnopt
from nnopt.errors import ConfigError, SelectionError
from nnopt.pruning import GradualPruneConfig, MagnitudePruneConfig, MaskKeeper, NMPruneConfig, finetune
from nnopt.pruning.magnitude import lamp_scores
from nnopt.pruning.schedule import cubic_sparsity

HIDDEN = ("features.0", "features.2")


def _sparsity(model, names):
    weights = [model.get_submodule(n).weight for n in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98])
def test_uniform_sparsity_is_exact_per_layer(trained_simplenet, sparsity):
    pruned = nnopt.prune(trained_simplenet, MagnitudePruneConfig(sparsity=sparsity))
    for name in HIDDEN:
        w = pruned.get_submodule(name).weight
        assert int((w == 0).sum()) == round(sparsity * w.numel())
        kept = w[w != 0].abs()
        dropped = trained_simplenet.get_submodule(name).weight[w == 0].abs()
        if kept.numel() and dropped.numel():
            assert dropped.max() <= kept.min()  # the smallest magnitudes went
    assert torch.equal(pruned.classifier.weight, trained_simplenet.classifier.weight)
    assert torch.equal(pruned.features[0].bias, trained_simplenet.features[0].bias)


def test_global_uses_one_threshold_across_layers(trained_simplenet):
    pruned = nnopt.prune(trained_simplenet, MagnitudePruneConfig(sparsity=0.8, allocation="global"))
    assert _sparsity(pruned, HIDDEN) == pytest.approx(0.8, abs=1e-3)
    kept = torch.cat([pruned.get_submodule(n).weight[pruned.get_submodule(n).weight != 0].abs() for n in HIDDEN])
    dropped = torch.cat([trained_simplenet.get_submodule(n).weight[pruned.get_submodule(n).weight == 0].abs()
                         for n in HIDDEN])
    assert dropped.max() <= kept.min()


def test_lamp_scores_and_allocation_never_empty_a_layer():
    w = torch.tensor([3.0, 1.0, 2.0])
    # sorted squares 1, 4, 9: scores 1/14, 4/13, 9/9
    torch.testing.assert_close(lamp_scores(w), torch.tensor([1.0, 1 / 14, 4 / 13], dtype=torch.float64))
    model = nnopt.create_model("lenet300", seed=0)
    with torch.no_grad():
        model.features[2].weight.mul_(0.001)  # a layer of tiny weights: global pruning would empty it
    lamp = nnopt.prune(model, MagnitudePruneConfig(sparsity=0.95, allocation="lamp"))
    glob = nnopt.prune(model, MagnitudePruneConfig(sparsity=0.95, allocation="global"))
    assert torch.count_nonzero(glob.features[2].weight) == 0
    assert torch.count_nonzero(lamp.features[2].weight) > 0
    assert _sparsity(lamp, HIDDEN) == pytest.approx(0.95, abs=1e-3)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_pattern_holds_in_every_group(trained_simplenet, n, m):
    pruned = nnopt.prune(trained_simplenet, NMPruneConfig(n=n, m=m))
    for name in HIDDEN:
        w = pruned.get_submodule(name).weight
        groups = w.reshape(-1, m)
        assert bool(((groups != 0).sum(1) <= n).all())
        original = trained_simplenet.get_submodule(name).weight.reshape(-1, m).abs()
        kept_min = torch.where(groups != 0, original, torch.inf).min(1).values
        dropped_max = torch.where(groups == 0, original, -torch.inf).max(1).values
        assert bool((dropped_max <= kept_min).all())  # the n largest of each group survive


def test_nm_on_conv_groups_input_channels():
    model = nnopt.create_model("resnet8", seed=0)
    pruned = nnopt.prune(model, NMPruneConfig(n=2, m=4, layers=("blocks.0.conv1.0",)))
    w = pruned.blocks[0].conv1[0].weight  # (out, in, kh, kw); groups along in at each position
    groups = w.permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool(((groups != 0).sum(1) == 2).all())


def test_bad_nm_and_sparsity_values():
    for n, m in ((4, 4), (5, 4), (0, 4)):
        with pytest.raises(ConfigError, match="N:M"):
            NMPruneConfig(n=n, m=m)
    model = nnopt.create_model("simplenet")
    with pytest.raises(ConfigError, match="does not divide"):
        nnopt.prune(model, NMPruneConfig(n=2, m=5))
    assert torch.count_nonzero(model.features[0].weight) == model.features[0].weight.numel()  # untouched
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="sparsity"):
            MagnitudePruneConfig(sparsity=bad)
    with pytest.raises(ConfigError, match="allocation"):
        MagnitudePruneConfig(allocation="best")


def test_a_model_without_prunable_weights_is_refused():
    with pytest.raises(nnopt.NnoptError, match="no float Linear, convolution"):
        nnopt.prune(nn.Sequential(nn.ReLU()), MagnitudePruneConfig(sparsity=0.5))
    with pytest.raises(SelectionError, match="final classifier"):
        nnopt.prune(nn.Sequential(nn.Linear(4, 2)), MagnitudePruneConfig(sparsity=0.5))


def test_masks_hold_through_finetuning(trained_simplenet, digits):
    pruned = nnopt.prune(trained_simplenet, MagnitudePruneConfig(sparsity=0.9))
    zeros = {n: pruned.get_submodule(n).weight == 0 for n in HIDDEN}

    class Check:
        def after_step(self, model):
            for n, z in zeros.items():
                assert bool((model.get_submodule(n).weight[z] == 0).all())

    nnopt.train(pruned, digits.train.subset(300), nnopt.TrainConfig(epochs=2),
                callbacks=[MaskKeeper.from_zeros(pruned), Check()], progress=False)
    finetune(pruned, digits.train.subset(300), nnopt.TrainConfig(epochs=1), progress=False)
    for n, z in zeros.items():
        assert bool((pruned.get_submodule(n).weight[z] == 0).all())
    assert not any("mask" in k for k in pruned.state_dict())


def test_cubic_schedule():
    values = [cubic_sparsity(t, 0, 100, 0.0, 0.9) for t in range(0, 101, 10)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[1] - values[0] > values[-1] - values[-2]  # fast at first, slow at the end
    assert cubic_sparsity(50, 0, 100, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))


def test_gradual_pruning_reaches_target_and_keeps_accuracy(digits):
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=15), progress=False)
    base = nnopt.accuracy(model, digits.test)
    config = GradualPruneConfig(final_sparsity=0.8, epochs=12, prune_steps=6)
    pruned = nnopt.prune(model, config, data=digits.train)
    assert _sparsity(pruned, HIDDEN) == pytest.approx(0.8, abs=2e-3)
    assert nnopt.accuracy(pruned, digits.test) >= base - 0.02
    from nnopt.lineage import get_lineage

    record = get_lineage(pruned).applied[-1]
    sparsities = [e["sparsity"] for e in record.details["schedule"]]
    assert len(sparsities) >= 6 and sparsities == sorted(sparsities)
    with pytest.raises(ConfigError, match="training data"):
        nnopt.prune(model, config)


def test_pruned_zeros_are_positive_zeros(trained_simplenet):
    # -0.0 would be a different bit pattern and cost space in the exact packed format
    for config in (MagnitudePruneConfig(sparsity=0.9), nnopt.ThresholdPruneConfig(threshold=0.1)):
        w = nnopt.prune(trained_simplenet, config).features[0].weight
        zeros = w[w == 0]
        assert zeros.numel() > 0 and not bool(torch.signbit(zeros).any())
