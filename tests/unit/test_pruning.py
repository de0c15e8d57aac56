import pytest
import torch

import nnopt
from nnopt.errors import ConfigError, SelectionError, UnsupportedModelError
from nnopt.lineage import get_lineage


def test_threshold_rule_exactly(trained_simplenet):
    theta = 0.05
    pruned = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=theta))
    # the final classifier is left alone unless selected
    assert torch.equal(pruned.classifier.weight, trained_simplenet.classifier.weight)
    pruned = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=theta, layers=("type:Linear",)))
    for name in ("features.0", "features.2", "classifier"):
        w = trained_simplenet.get_submodule(name).weight.detach()
        expected = torch.where(w.abs() < theta, torch.zeros_like(w), w)
        assert torch.equal(pruned.get_submodule(name).weight.detach(), expected)
        # biases are never touched
        assert torch.equal(pruned.get_submodule(name).bias, trained_simplenet.get_submodule(name).bias)


def test_input_model_is_not_modified(trained_simplenet):
    before = {k: v.clone() for k, v in trained_simplenet.state_dict().items()}
    nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=1.0))
    for key, value in trained_simplenet.state_dict().items():
        assert torch.equal(value, before[key])


def test_record_and_sparsity_details(trained_simplenet):
    pruned = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.05, layers=("classifier",)))
    applied = get_lineage(pruned).applied[-1]
    assert applied.name == "prune-threshold"
    assert applied.config["threshold"] == 0.05
    layer = applied.details["layers"]["classifier"]
    assert layer["zeros"] == int((pruned.classifier.weight == 0).sum()) > 0
    assert list(applied.details["layers"]) == ["classifier"]
    assert torch.equal(pruned.features[0].weight, trained_simplenet.features[0].weight)


def test_zero_threshold_changes_nothing_and_huge_threshold_zeros_all(trained_simplenet):
    same = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.0))
    assert torch.equal(same.classifier.weight, trained_simplenet.classifier.weight)
    empty = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=1e9))
    assert torch.count_nonzero(empty.features[0].weight) == 0


def test_pruning_a_cnn_covers_conv_layers():
    model = nnopt.create_model("resnet8", seed=0)
    pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.1))
    assert (pruned.stem[0][0].weight == 0).any()


def test_errors():
    model = nnopt.create_model("simplenet")
    with pytest.raises(SelectionError):
        nnopt.prune(model, nnopt.ThresholdPruneConfig(layers=("nope",)))
    with pytest.raises(ConfigError, match="not a pruning config"):
        nnopt.prune(model, nnopt.WeightQuantConfig())
    quantized = nnopt.quantize(model)
    with pytest.raises(UnsupportedModelError, match="before quantizing"):
        nnopt.prune(quantized, nnopt.ThresholdPruneConfig(layers=("classifier",)))
