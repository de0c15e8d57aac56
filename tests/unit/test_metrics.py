import pytest
import torch
from torch import nn

import nnopt
from nnopt.errors import ConfigError
from nnopt.metrics import compare_latency, measure, profile_model


def test_simplenet_macs_and_params():
    profile = profile_model(nnopt.create_model("simplenet"))
    assert [layer.macs for layer in profile.layers] == [64 * 64, 64 * 32, 32 * 10]
    assert profile.params == 6570 and profile.nonzeros == 6570
    assert profile.tensor_bytes == 6570 * 4


def test_conv_macs_match_hand_count():
    model = nnopt.create_model("resnet8", widths=(4, 8), seed=0)
    macs = {layer.name: layer.macs for layer in profile_model(model).layers}
    assert macs["stem.0.0"] == 8 * 8 * 4 * (1 * 3 * 3)  # output elements × inputs per output
    assert macs["blocks.1.conv1.0"] == 4 * 4 * 8 * (4 * 3 * 3)  # stride 2: 4×4 output
    assert macs["blocks.1.shortcut.0"] == 4 * 4 * 8 * 4
    assert macs["classifier"] == 8 * 10


def test_nonzeros_count_pruned_and_quantized_weights(trained_simplenet):
    pruned = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.05))
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, nn.Linear))
    profile = profile_model(nnopt.quantize(pruned))
    assert profile.params == 6570
    assert profile.nonzeros <= 6570 - zeros  # rounding can only add zeros
    assert profile.layers[0].dtype == "int8"
    assert "features.0" in str(profile)


def test_measure_returns_a_table_and_plausible_latency(trained_simplenet, digits):
    m = measure(trained_simplenet, digits.test, name="base", batch_sizes=(1, 32), min_seconds=0.05)
    assert m.accuracy > 0.9 and m.params == 6570 and m.macs == 6464
    assert m.latency.threads == torch.get_num_threads()
    for batch in (1, 32):
        timing = m.latency.at(batch)
        assert 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms
        assert timing.calls >= 20
    text = str(m)
    assert "base" in text and "ms @32" in text


def test_latency_orders_a_big_model_above_a_small_one():
    small = nn.Linear(64, 8)
    big = nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)])
    stats = compare_latency({"small": small, "big": big}, (64,), batch_sizes=(256,), min_seconds=0.1)
    assert stats["big"].at(256).median_ms > stats["small"].at(256).median_ms


def test_bad_batch_sizes():
    with pytest.raises(ConfigError):
        compare_latency({"m": nn.Linear(2, 2)}, (2,), batch_sizes=(0,))
