import dataclasses

import pytest

from nnopt.errors import ConfigError
from nnopt.pruning import ThresholdPruneConfig
from nnopt.quantization import WeightQuantConfig
from nnopt.training import TrainConfig


def test_round_trip_through_dict():
    cfg = WeightQuantConfig(bits=4, per_channel=True, layers=("fc1", "re:^features"))
    assert WeightQuantConfig.from_dict(cfg.to_dict()) == cfg


def test_lists_become_tuples_and_configs_are_frozen():
    cfg = ThresholdPruneConfig.from_dict({"threshold": 0.1, "layers": ["a", "b"]})
    assert cfg.layers == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 1.0  # type: ignore[misc]


def test_unknown_key_is_named_with_its_place():
    with pytest.raises(ConfigError, match=r"'treshold'.*in pass 2"):
        ThresholdPruneConfig.from_dict({"treshold": 0.1}, where="pass 2")


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="bits"):
        WeightQuantConfig(bits="8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=True)  # bool is not an int here


def test_kind_mismatch_is_rejected():
    with pytest.raises(ConfigError, match="kind"):
        ThresholdPruneConfig.from_dict(WeightQuantConfig().to_dict())


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match="bits"):
        WeightQuantConfig(bits=bits)


@pytest.mark.parametrize("threshold", [-0.01, float("nan"), float("inf")])
def test_bad_threshold(threshold):
    with pytest.raises(ConfigError, match="threshold"):
        ThresholdPruneConfig(threshold=threshold)


def test_bad_regex_pattern_fails_early():
    with pytest.raises(ConfigError, match="pattern"):
        ThresholdPruneConfig(layers=("re:(",))
