"""Unstructured pruning, MAC counts, energy and BatchNorm folding on layer types of user models:
Conv1d, depthwise convolutions, ConvTranspose, LSTM/GRU, nn.MultiheadAttention, Embedding."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import nnopt
from nnopt.energy import estimate_energy
from nnopt.errors import ConfigError
from nnopt.metrics.profile import count_macs

_SPEC = importlib.util.spec_from_file_location(
    "user_models", Path(__file__).resolve().parents[2] / "examples" / "user_models.py")
user_models = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(user_models)


def _sparsity(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


def test_magnitude_pruning_reaches_recurrent_attention_and_embedding_weights():
    torch.manual_seed(0)
    model = user_models.LSTMClassifier(vocab=50, embed=16, hidden=16)
    lstm = nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.5))
    for name in ("weight_ih_l0", "weight_hh_l0"):
        assert _sparsity(getattr(lstm.lstm, name)) == pytest.approx(0.5, abs=0.01)
    assert _sparsity(lstm.embedding.weight) == pytest.approx(0.5, abs=0.01)
    assert _sparsity(lstm.head.weight) == 0.0  # the final classifier is left alone by default
    assert lstm(torch.randint(0, 50, (2, 7))).shape == (2, 4)
    model = user_models.TinyViT(dim=16, depth=1, heads=2, mlp=32)
    nn.init.normal_(model.blocks[0].attn.in_proj_bias)
    vit = nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.5))
    attn = vit.blocks[0].attn
    assert _sparsity(attn.in_proj_weight) == pytest.approx(0.5, abs=0.01)
    assert _sparsity(attn.out_proj.weight) == pytest.approx(0.5, abs=0.01)
    assert _sparsity(attn.in_proj_bias) == 0.0  # biases are never pruned


def test_nm_pruning_leaves_depthwise_convolutions_dense_by_default_and_refuses_them_when_selected():
    torch.manual_seed(0)
    model = user_models.MobileNetSE(width=16)
    pruned = nnopt.prune(model, nnopt.NMPruneConfig(n=2, m=4))
    depthwise = pruned.blocks[1].depthwise[0]
    assert depthwise.groups == depthwise.in_channels
    assert torch.equal(depthwise.weight, model.blocks[1].depthwise[0].weight)
    groups = pruned.blocks[1].expand[0].weight.movedim(1, -1).reshape(-1, 4)
    assert bool(((groups != 0).sum(1) <= 2).all())
    with pytest.raises(ConfigError, match="does not divide its input dimension 1"):
        nnopt.prune(model, nnopt.NMPruneConfig(n=2, m=4, layers=("blocks.1.depthwise.0",)))


def test_nm_groups_run_along_input_channels_of_conv1d():
    conv = nn.Sequential(nn.Conv1d(8, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 1))
    pruned = nnopt.prune(conv, nnopt.NMPruneConfig(n=1, m=4))
    groups = pruned[0].weight.permute(0, 2, 1).reshape(-1, 4)  # (out, k, in): groups of 4 input channels
    assert bool(((groups != 0).sum(1) == 1).all())


def test_gradual_pruning_masks_recurrent_weights_through_training():
    torch.manual_seed(0)
    model = user_models.LSTMClassifier(vocab=30, embed=8, hidden=8, classes=3)
    data = nnopt.data.Split(torch.randint(0, 30, (64, 6)), torch.randint(0, 3, (64,)))
    config = nnopt.GradualPruneConfig(final_sparsity=0.6, epochs=2, batch_size=16, allocation="uniform")
    pruned = nnopt.prune(model, config, data=data)
    assert _sparsity(pruned.lstm.weight_hh_l0) == pytest.approx(0.6, abs=0.05)


def test_macs_of_recurrent_attention_and_transposed_layers_follow_their_formulas():
    lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
    macs = count_macs(nn.Sequential(lstm), (7, 6))
    per_step = sum(getattr(lstm, n).numel() for n in lstm._flat_weights_names if n.startswith("weight_"))
    assert macs["0"] == 7 * per_step  # every step multiplies every weight matrix once

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    macs = count_macs(Attend(), (5, 8))
    assert macs == {"attn": 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8}  # q, k, v, out projections + scores and mixing

    up = nn.ConvTranspose2d(3, 4, kernel_size=3, stride=2)
    assert count_macs(nn.Sequential(up), (3, 5, 5))["0"] == 3 * 5 * 5 * 4 * 3 * 3


def test_profile_counts_every_parameter_of_user_models_and_energy_takes_token_ids():
    for model, shape in ((user_models.TinyViT(dim=16, depth=1, heads=2, mlp=32), (3, 32, 32)),
                         (user_models.LSTMClassifier(vocab=50, embed=8, hidden=8), (9,)),
                         (user_models.TimeSeriesCNN(width=8), (3, 40))):
        profile = nnopt.profile_model(model, shape)
        assert profile.params == sum(p.numel() for p in model.parameters())
        assert profile.macs > 0
        estimate = estimate_energy(model, batch=2, input_shape=shape)
        assert math.isfinite(estimate.total_mj) and estimate.macs_per_inference == pytest.approx(profile.macs)


def test_batchnorm_folds_into_transposed_convolutions_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Identity())
    bn = net[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    net.eval()
    folded = nnopt.simplify(net, nnopt.FoldBatchNormConfig())
    x = torch.randn(2, 4, 5, 5)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    grouped = nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6)).eval()
    assert isinstance(nnopt.simplify(grouped, nnopt.FoldBatchNormConfig())[1], nn.BatchNorm1d)  # left, with its reason


def test_profile_and_energy_of_a_quantized_recurrent_model_count_its_lookups_and_steps():
    model = user_models.LSTMClassifier(vocab=50, embed=8, hidden=8)
    quantized = nnopt.quantize(model, nnopt.DynamicQuantConfig())  # int8 table and int8 recurrent weights
    assert type(quantized.lstm) is not nn.LSTM and type(quantized.embedding) is not nn.Embedding
    assert nnopt.profile_model(quantized, (9,)).macs == nnopt.profile_model(model, (9,)).macs > 0
    assert estimate_energy(quantized, batch=2, input_shape=(9,)).macs_per_inference > 0


@pytest.mark.parametrize("config", [nnopt.WeightQuantConfig(bits=4), nnopt.ClusterConfig(bits=4)])
def test_compressed_recurrent_and_attention_layers_count_the_macs_of_the_layers_they_stand_for(config):
    for model, shape in ((user_models.LSTMClassifier(vocab=50, embed=8, hidden=8), (9,)),
                         (user_models.TinyViT(image=16, patch=4, dim=16, depth=1, heads=2, mlp=32), (3, 16, 16))):
        compressed = nnopt.quantize(model, config)
        assert nnopt.profile_model(compressed, shape).macs == nnopt.profile_model(model, shape).macs


def test_energy_counts_compressed_recurrent_and_attention_layers_without_float_parameters():
    class Bare(nn.Module):  # no biases: once compressed, every weight of these layers is an integer code
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(6, 8, bias=False, batch_first=True)
            self.attn = nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.rnn(x)[0]
            return self.head(self.attn(h, h, h, need_weights=False)[0][:, -1])

    model = Bare()
    before = {layer.name: layer.macs for layer in estimate_energy(model, input_shape=(5, 6)).layers}
    after = {layer.name: layer.macs for layer in estimate_energy(
        nnopt.quantize(model, nnopt.WeightQuantConfig(bits=4)), input_shape=(5, 6)).layers}
    assert before == after and before["rnn"] > 0 and before["attn"] > 0


def test_split_attention_counts_the_same_macs_as_the_attention_it_replaces():
    import copy

    from nnopt.pruning.structured.transformer_blocks import prepare_transformer

    vit = user_models.TinyViT(image=8, patch=4, dim=16, depth=1, heads=2, mlp=32).eval()
    split = copy.deepcopy(vit)
    prepare_transformer(split)  # nn.MultiheadAttention -> SplitMultiheadAttention, equal outputs
    assert sum(count_macs(split, (3, 8, 8)).values()) == sum(count_macs(vit, (3, 8, 8)).values())
    before, after = estimate_energy(vit, input_shape=(3, 8, 8)), estimate_energy(split, input_shape=(3, 8, 8))
    assert after.macs_per_inference == pytest.approx(before.macs_per_inference)
    assert after.total_mj == pytest.approx(before.total_mj, rel=0.03)  # its projections' activations count once
