"""Structured pruning of CNN patterns on user-written models: Conv1d, depthwise and grouped
convolutions (inverted residuals), squeeze-and-excitation products, ConvTranspose, Linear on tokens
(n, T, d), and the layers whose channels are refused (LSTM/GRU, Embedding, MultiheadAttention).

For each pattern: the groups found, masked == physical (zeroing the channels in place gives the same
outputs as cutting them out), and replay (the recorded shapes re-created on a fresh copy of the
architecture load the pruned weights strictly and give the same outputs)."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnopt
from nnopt.data import Split
from nnopt.errors import SelectionError
from nnopt.lineage import get_lineage
from nnopt.pruning.structured import StructuredPruneConfig
from nnopt.pruning.structured.groups import ChannelGroup, channel_groups
from nnopt.pruning.structured.importance import ImportanceInputs, accumulate_gradients, score
from nnopt.pruning.structured.surgery import mask_channels, remove_channels, resize_layers
from nnopt.pruning.structured.traced import traced_groups

_SPEC = importlib.util.spec_from_file_location(
    "user_models", Path(__file__).resolve().parents[2] / "examples" / "user_models.py")
assert _SPEC is not None and _SPEC.loader is not None
user_models = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(user_models)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on 2 shared cores: intra-op threads cost far more than they save (a MobileNetSE
    forward at 32×32 took ~2.4 s with 2 threads under load, ~10 ms with 1). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _group(groups: list[ChannelGroup], module: str, role: str = "out") -> ChannelGroup:
    found = [g for g in groups if any(m.module == module and m.role == role for m in g.members)]
    assert len(found) == 1, (module, role, [g.to_dict() for g in groups])
    return found[0]


def _roles(group: ChannelGroup) -> set[tuple[str, str]]:
    return {(m.module, m.role) for m in group.members}


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine values, so that norm slicing is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def _masked_equals_physical(model: nn.Module, x: torch.Tensor, only: set[str] | None = None) -> dict:
    """Cut every third channel of every prunable group (or of the groups named in ``only``); the cut
    model runs, is smaller, and equals the masked one. Returns the recorded shapes."""
    model.eval()
    groups = channel_groups(model, x)
    removed = {g.name: torch.arange(0, g.size, 3) for g in groups if g.prunable and (only is None or g.name in only)}
    assert removed, [g.to_dict() for g in groups]
    masked, physical = copy.deepcopy(model), copy.deepcopy(model)
    mask_channels(masked, groups, removed)
    shapes = remove_channels(physical, groups, removed)
    assert sum(p.numel() for p in physical.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(physical.eval()(x), masked.eval()(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(masked(x), model(x), atol=1e-4)  # the cut channels mattered
    return shapes


def _pruned_and_replayed(build: Callable[[], nn.Module], x: torch.Tensor, **config: object) -> tuple[nn.Module, dict]:
    """nnopt.prune at ratio 0.5 (l1, the data only traces), then the record replayed on a fresh build."""
    torch.manual_seed(0)
    model = build().eval()
    _randomize_norms(model)
    data = Split(x, torch.zeros(x.shape[0], dtype=torch.int64))
    pruned = nnopt.prune(model, StructuredPruneConfig(**{"ratio": 0.5, "importance": "l1", **config}), data=data)
    shapes = get_lineage(pruned).applied[-1].details["shapes"]
    fresh = build()
    resize_layers(fresh, shapes)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x), atol=1e-6, rtol=1e-6)
    return pruned, shapes


# --------------------------------------------------------------------------- 1. Conv1d


def test_time_series_cnn_hidden_channels_are_groups_and_cut_exactly():
    torch.manual_seed(0)
    model = user_models.TimeSeriesCNN(width=8)
    _randomize_norms(model)
    x = torch.randn(3, 3, 32)
    groups = channel_groups(model.eval(), x)
    first = _group(groups, "features.0")
    assert first.prunable and _roles(first) == {("features.0", "out"), ("features.1", "norm"), ("features.3", "in")}
    last = _group(groups, "features.6")  # through AdaptiveAvgPool1d and flatten into the head's columns
    assert last.prunable and ("head", "in") in _roles(last) and ("features.7", "norm") in _roles(last)
    assert _group(groups, "head").frozen == "network output"
    _masked_equals_physical(model, x)


def test_time_series_cnn_ratio_half_cuts_each_hidden_conv_and_replays():
    pruned, shapes = _pruned_and_replayed(lambda: user_models.TimeSeriesCNN(width=8), torch.randn(4, 3, 40))
    convs = [pruned.features[i] for i in (0, 3, 6)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 4), (4, 8), (8, 8)]
    assert pruned.features[7].num_features == 8 and pruned.head.in_features == 8
    assert shapes["features.3"] == {"type": "Conv1d", "out": 8, "in": 4}


class Conv1dVariants(nn.Module):
    """Conv1d geometry (padding modes, dilation, stride) and every 1-D pooling, functional forms too."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 9, 3, padding=2, dilation=2, padding_mode="circular")
        self.bn = nn.BatchNorm1d(9)
        self.pool = nn.MaxPool1d(2)
        self.b = nn.Conv1d(9, 8, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.avg = nn.AvgPool1d(2, ceil_mode=True)
        self.c = nn.Conv1d(8, 7, 1, padding="same", padding_mode="replicate")
        self.gmax = nn.AdaptiveMaxPool1d(2)
        self.fc = nn.Linear(14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.relu6(self.bn(self.a(x))))
        h = F.avg_pool1d(F.hardswish(self.avg(self.b(h))), 1)
        h = self.gmax(F.silu(self.c(h))) + F.adaptive_avg_pool1d(h[:, :1], 2)[:, :, :1]  # broadcast (n,1,1)
        return self.fc(h.flatten(1))


def test_conv1d_geometry_and_1d_pooling_cut_exactly_and_replay():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 23)
    model = Conv1dVariants()
    _randomize_norms(model)
    groups = channel_groups(model.eval(), x)
    assert _group(groups, "a").prunable and _group(groups, "c").prunable
    assert not _group(groups, "b").prunable  # h[:, :1] selects some of its channels
    assert "selects" in _group(groups, "b").frozen
    assert _roles(_group(groups, "c")) == {("c", "out"), ("fc", "in")}
    assert [m.inner for m in _group(groups, "c").members if m.module == "fc"] == [2]  # flatten: blocks of 2
    _masked_equals_physical(model, x)
    pruned, shapes = _pruned_and_replayed(Conv1dVariants, x)
    assert pruned.a.padding_mode == "circular" and pruned.a.dilation == (2,) and pruned.a.out_channels == 5
    assert pruned.c.padding == "same" and pruned.fc.in_features == 2 * pruned.c.out_channels


# --------------------------------------------------------------------------- 2. depthwise and grouped convolutions, SE


def test_inverted_residual_expanded_channels_are_one_group_with_se_gate():
    torch.manual_seed(0)
    model = user_models.MobileNetSE(width=8)
    _randomize_norms(model)
    x = torch.randn(2, 3, 32, 32)
    groups = channel_groups(model.eval(), x)
    expanded = _group(groups, "blocks.3.expand.0")
    assert expanded.prunable and _roles(expanded) == {
        ("blocks.3.expand.0", "out"), ("blocks.3.expand.1", "norm"), ("blocks.3.depthwise.0", "depthwise"),
        ("blocks.3.depthwise.1", "norm"), ("blocks.3.se.fc1", "in"), ("blocks.3.se.fc2", "out"),
        ("blocks.3.project.0", "in"),
    }
    hidden = _group(groups, "blocks.3.se.fc1")  # the SE bottleneck is a group of its own
    assert hidden.prunable and _roles(hidden) == {("blocks.3.se.fc1", "out"), ("blocks.3.se.fc2", "in")}
    assert not [g for g in groups if not g.prunable and g.frozen not in ("network input", "network output")]
    _masked_equals_physical(model, x)


def test_mobilenet_se_ratio_half_halves_the_expanded_channels_and_replays():
    pruned, shapes = _pruned_and_replayed(lambda: user_models.MobileNetSE(width=8), torch.randn(2, 3, 32, 32))
    block = pruned.blocks[3]
    dw = block.depthwise[0]
    assert block.expand[0].out_channels == 72 and (dw.in_channels, dw.out_channels, dw.groups) == (72, 72, 72)
    assert dw.weight.shape == (72, 1, 3, 3) and block.depthwise[1].num_features == 72
    assert (block.se.fc1.in_channels, block.se.fc1.out_channels, block.se.fc2.out_channels) == (72, 18, 72)
    assert block.project[0].in_channels == 72 and pruned.classifier[1].in_features == 160
    assert shapes["blocks.3.depthwise.0"] == {"type": "Conv2d", "out": 72, "in": 72, "groups": 72}


class DepthwiseMultiplier(nn.Module):
    """Depthwise convolutions with channel multipliers 2 (2-D) and 1 (1-D over flattened pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.bn = nn.BatchNorm2d(12)
        self.dw1 = nn.Conv1d(12, 12, 3, padding=1, groups=12, bias=False)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw1(F.relu(self.bn(self.dw(F.relu(self.a(x))))).flatten(2))  # (n, 12, H·W)
        return self.fc(h.mean(-1))


def test_depthwise_with_a_channel_multiplier_cuts_its_blocks_of_outputs():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 5)
    model = DepthwiseMultiplier()
    _randomize_norms(model)
    groups = channel_groups(model.eval(), x)
    group = _group(groups, "a")
    assert group.prunable and group.size == 6
    inner = {m.module: m.inner for m in group.members}
    assert inner == {"a": 1, "dw": 2, "bn": 2, "dw1": 2, "fc": 2}  # channel c → outputs 2c, 2c+1 downstream
    _masked_equals_physical(model, x)
    pruned, shapes = _pruned_and_replayed(DepthwiseMultiplier, x)
    assert (pruned.dw.in_channels, pruned.dw.out_channels, pruned.dw.groups) == (3, 6, 3)
    assert pruned.dw1.groups == 6 and pruned.fc.in_features == 6


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.g(F.relu(self.a(x)))))))


def test_grouped_convolution_freezes_both_sides_with_its_reason():
    x = torch.randn(2, 3, 6, 6)
    groups = channel_groups(Grouped().eval(), x)
    for module, role in (("a", "out"), ("b", "in")):  # what goes into g and what comes out of it
        assert _group(groups, module, role).frozen == "grouped convolution g (groups=2)"
    assert _group(groups, "b").prunable
    pruned = nnopt.prune(Grouped().eval(), StructuredPruneConfig(ratio=0.5, importance="l1"),
                         data=Split(x, torch.zeros(2, dtype=torch.int64)))
    assert (pruned.g.in_channels, pruned.g.out_channels, pruned.g.groups) == (8, 8, 2) and pruned.b.out_channels == 3


class FunctionalSE(nn.Module):
    """SE gates written with functional forms and hand pooling, 2-D and 1-D, plus a spatial gate (n,1,H,W)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.spatial = nn.Conv2d(8, 1, 1)
        self.b = nn.Conv1d(8, 6, 1)
        self.se1 = nn.Conv1d(6, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.a(x))
        gate = torch.sigmoid(self.fc2(F.relu6(self.fc1(h.mean((2, 3))))))  # (n, 8): channels on the last dim
        h = h * gate[:, :, None, None]
        h = h * F.hardsigmoid(self.spatial(h))  # broadcast over channels: h's channels stay free
        s = F.gelu(self.b(h.flatten(2)))  # (n, 6, H·W)
        s = s * torch.sigmoid(self.se1(s.amax(-1, keepdim=True)))  # 1-D SE: (n, 6, 1)
        return self.head(s.sum(-1))


def test_broadcast_products_couple_the_gate_with_the_channels_it_scales():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 4)
    groups = channel_groups(FunctionalSE().eval(), x)
    gated = _group(groups, "a")
    assert gated.prunable and {("fc1", "in"), ("fc2", "out"), ("spatial", "in"), ("b", "in")} <= _roles(gated)
    assert _group(groups, "fc1").prunable
    assert "broadcasts it over channels" in _group(groups, "spatial").frozen
    one_d = _group(groups, "b")
    assert one_d.prunable and {("se1", "in"), ("se1", "out"), ("head", "in")} <= _roles(one_d)
    _masked_equals_physical(FunctionalSE(), x)
    pruned, _ = _pruned_and_replayed(FunctionalSE, x)
    assert (pruned.a.out_channels, pruned.fc2.out_features, pruned.se1.out_channels) == (4, 4, 3)


# --------------------------------------------------------------------------- 4. ConvTranspose


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.up1 = nn.ConvTranspose2d(6, 10, 3, stride=2, padding=1, output_padding=1)
        self.bn1 = nn.BatchNorm2d(10)
        self.up2 = nn.ConvTranspose2d(10, 2, 2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(F.relu(self.bn1(self.up1(F.relu(self.bn(self.enc(x)))))))


def test_conv_transpose_cuts_output_channels_on_weight_dim_1():
    torch.manual_seed(4)
    x = torch.randn(2, 2, 8, 8)
    model = Decoder()
    _randomize_norms(model)
    groups = channel_groups(model.eval(), x)
    up = _group(groups, "up1")
    assert up.prunable and _roles(up) == {("up1", "out"), ("bn1", "norm"), ("up2", "in")}
    assert _roles(_group(groups, "enc")) == {("enc", "out"), ("bn", "norm"), ("up1", "in")}
    _masked_equals_physical(model, x)
    pruned, shapes = _pruned_and_replayed(Decoder, x)
    assert pruned.up1.weight.shape == (3, 5, 3, 3) and pruned.up1.output_padding == (1, 1)
    assert pruned.up2.weight.shape == (5, 2, 2, 2) and pruned.up2.dilation == (2, 2)
    assert shapes["up1"] == {"type": "ConvTranspose2d", "out": 5, "in": 3}


def test_l1_importance_reads_a_transposed_weight_by_output_channel():
    model = Decoder().eval()
    group = _group(channel_groups(model, torch.randn(2, 2, 8, 8)), "up1")
    scores = score("l1", ImportanceInputs(model, group, None))
    w1, w2 = model.up1.weight.detach(), model.up2.weight.detach()
    hand = (w1.abs().sum((0, 2, 3)) + model.up1.bias.detach().abs() + model.bn1.weight.detach().abs()
            + model.bn1.bias.detach().abs() + w2.abs().sum((1, 2, 3)))
    torch.testing.assert_close(scores, hand.double())


# --------------------------------------------------------------------------- 5. Linear on tokens


class TokenMLP(nn.Module):
    """(n, T, d) tokens: LayerNorm'd residual stream, a plain-Linear MLP, a token-wise gate, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 12)
        self.gate = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        y = self.norm(h)
        h = h + self.down(F.gelu(self.up(y)) * F.silu(self.gate(y)))
        return self.head(h[:, 1:].mean(1))


def test_linear_on_tokens_prunes_the_mlp_hidden_and_freezes_the_normalized_stream():
    torch.manual_seed(5)
    x = torch.randn(2, 4, 5)
    groups = channel_groups(TokenMLP().eval(), x)
    hidden = _group(groups, "up")
    assert hidden.prunable and _roles(hidden) == {("up", "out"), ("gate", "out"), ("down", "in")}
    stream = _group(groups, "embed")
    assert not stream.prunable and "LayerNorm norm normalizes across the channels" in stream.frozen
    assert stream is _group(groups, "down") and ("head", "in") in _roles(stream)
    _masked_equals_physical(TokenMLP(), x)
    pruned, shapes = _pruned_and_replayed(TokenMLP, x)
    assert (pruned.up.out_features, pruned.down.in_features, pruned.norm.normalized_shape) == (6, 6, (8,))


class ChannelsMoved(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 1)
        self.fc = nn.Linear(6, 4)
        self.conv2 = nn.Conv1d(4, 5, 1)
        self.side = nn.Linear(7, 7)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(F.relu(self.conv(x)).transpose(1, 2))  # (n, L, 4): conv's channels moved to the last dim
        g = self.conv2(h.transpose(1, 2))  # (n, 5, L)
        g = self.side(g)  # a Linear over L: conv2's channels stay on dim 1, untouched but no longer followed
        return self.out(g.mean(-1))


def test_moving_the_channel_dim_freezes_with_the_operation_named():
    groups = channel_groups(ChannelsMoved().eval(), torch.randn(2, 3, 7))
    assert "transpose" in _group(groups, "conv").frozen and "moves the channel dim" in _group(groups, "conv").frozen
    assert "transpose" in _group(groups, "fc").frozen
    moved = _group(groups, "conv2")
    assert not moved.prunable and "Linear side reads dim -1 but the channels are on dim 1" in moved.frozen
    assert _group(groups, "side").prunable is False  # its output feeds mean(-1): reduced across its channels


def test_tiny_vit_mlp_hidden_layers_prune_exactly_and_attention_is_refused_by_the_trace():
    # The fx trace on its own (channel_groups sends transformer blocks to transformer_blocks, which cuts heads)
    torch.manual_seed(6)
    build = lambda: user_models.TinyViT(image=16, patch=4, dim=16, depth=2, heads=2, mlp=24)  # noqa: E731
    x = torch.randn(2, 3, 16, 16)
    groups = traced_groups(build().eval(), x)
    hidden = [g for g in groups if g.prunable]
    assert sorted(g.name for g in hidden) == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert _roles(hidden[0]) == {("blocks.0.mlp.0", "out"), ("blocks.0.mlp.2", "in")}
    assert not _group(groups, "blocks.0.mlp.2").prunable  # the residual stream
    _masked_equals_physical(build(), x)


# --------------------------------------------------------------------------- 6. refused layers


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.rnn = kind(6, 5, batch_first=True)
        self.b = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(F.relu(self.a(x)))
        return self.b(out[:, -1])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.b = nn.Linear(8, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(F.relu(self.b(self.attn(h, h, h, need_weights=False)[0])))


@pytest.mark.parametrize("kind, words", [(nn.LSTM, "recurrent layer LSTM rnn"), (nn.GRU, "recurrent layer GRU rnn")])
def test_recurrent_layers_freeze_the_channels_they_read(kind, words):
    groups = channel_groups(Recurrent(kind).eval(), torch.randn(2, 3, 4))
    assert words in _group(groups, "a").frozen
    assert not [g for g in groups if g.prunable]


def test_multihead_attention_freezes_its_inputs_and_the_rest_still_prunes_in_the_trace():
    # the fx trace on its own: channel_groups sends models with attention to transformer_blocks
    groups = traced_groups(Attention().eval(), torch.randn(2, 3, 4))
    assert "MultiheadAttention attn" in _group(groups, "a").frozen
    assert _group(groups, "b").prunable


def test_lstm_classifier_has_nothing_to_cut_and_says_why():
    model = user_models.LSTMClassifier(vocab=20, embed=8, hidden=8)
    ids = torch.randint(0, 20, (4, 5))
    with pytest.raises(SelectionError, match="no prunable channel group.*Embedding embedding"):
        nnopt.prune(model, StructuredPruneConfig(importance="l1"), data=Split(ids, torch.zeros(4, dtype=torch.int64)))


# --------------------------------------------------------------------------- importance on the new members


def test_gradient_importance_counts_depthwise_rows():
    torch.manual_seed(7)
    model = user_models.MobileNetSE(width=8).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    group = _group(channel_groups(model, x[:2]), "blocks.3.expand.0")
    grads = accumulate_gradients(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), 1)
    scores = score("gradient", ImportanceInputs(model, group, grads))
    own = (grads.abs_sum["blocks.3.expand.0.weight"].sum((1, 2, 3))
           + grads.abs_sum["blocks.3.depthwise.0.weight"].sum((1, 2, 3))
           + grads.abs_sum["blocks.3.se.fc2.weight"].sum((1, 2, 3)) + grads.abs_sum["blocks.3.se.fc2.bias"])
    torch.testing.assert_close(scores, own.double())


class ShapeOps(nn.Module):
    """Operations on the other dims keep the channels whole: pad, interpolate, softmax over pixels,
    view/unsqueeze/squeeze, a transpose of two spatial dims; softmax over the channels does not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3)
        self.b = nn.Conv2d(6, 5, 1)
        self.c = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.pad(F.relu(self.a(x)), (1, 1, 1, 1)), scale_factor=0.5)  # (n, 6, 4, 4)
        n, c = h.shape[0], h.shape[1]
        h = F.softmax(h.view(n, c, -1), dim=-1).unsqueeze(-1).view(n, c, 4, 4).transpose(2, 3)
        g = torch.softmax(self.b(h), dim=1)  # across b's channels: frozen
        return self.fc(F.interpolate(self.c(g), size=(6, 6)).reshape(n, -1))


def test_operations_on_other_dims_keep_channels_and_softmax_across_them_freezes():
    torch.manual_seed(8)
    x = torch.randn(2, 2, 8, 8)
    groups = channel_groups(ShapeOps().eval(), x)
    a = _group(groups, "a")
    assert a.prunable and _roles(a) == {("a", "out"), ("b", "in")}
    assert "normalizes across the channels" in _group(groups, "b").frozen and "softmax" in _group(groups, "b").frozen
    assert [m.inner for m in _group(groups, "c").members if m.module == "fc"] == [36]
    _masked_equals_physical(ShapeOps(), x)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 6, 3, padding=1)
        self.mid = nn.Conv1d(6, 6, 3, padding=1)
        self.b = nn.Conv1d(6, 6, 1)
        self.head = nn.Conv1d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mid(torch.relu(self.mid(torch.relu(self.a(x))))))  # one weight, two places
        return self.head(torch.relu(self.b(h)))


def test_a_layer_called_twice_is_frozen_and_the_rest_still_prunes():
    groups = channel_groups(CalledTwice().eval(), torch.randn(2, 2, 8))
    assert "called more than once" in _group(groups, "a").frozen
    assert not any(m.module == "mid" for g in groups if g.prunable for m in g.members)
    pruned = nnopt.prune(CalledTwice().eval(), StructuredPruneConfig(ratio=0.5, importance="l1"),
                         data=torch.randn(4, 2, 8))
    assert (pruned.a.out_channels, pruned.mid.out_channels, pruned.b.out_channels) == (6, 6, 3)
