"""Structured pruning of attention heads and MLP neurons in ViT, GPT-2, Llama-style and user-written
(nn.MultiheadAttention) transformer blocks: groups found, masked == physical, replay on load."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nnopt.errors import ConfigError, ModelFormatError
from nnopt.layers.attention import SplitMultiheadAttention, split_multihead_attention
from nnopt.pruning.structured.groups import ChannelGroup
from nnopt.pruning.structured.surgery import mask_channels, remove_channels, resize_layers
from nnopt.pruning.structured.transformer_blocks import (
    RESIDUAL_REASON,
    is_transformer,
    prepare_transformer,
    replay_prepare,
    sync_heads,
    transformer_groups,
)

transformers = pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _user_models() -> Any:
    spec = importlib.util.spec_from_file_location("user_models", EXAMPLES / "user_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("user_models", module)
    spec.loader.exec_module(module)
    return module


def _vit() -> nn.Module:
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(config)


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                                n_positions=64))


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(config)


def _tiny_vit() -> nn.Module:
    return _user_models().TinyViT(image=16, patch=4, dim=32, depth=2, heads=4, mlp=64)


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))}


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _cut(model: nn.Module, groups: list[ChannelGroup], removed: dict[str, torch.Tensor]) -> dict[str, Any]:
    # remove_channels' own head branch is BERT's (it sets attention_head_size); these heads are synced here
    plain = [dataclasses.replace(g, kind="channel") for g in groups]
    shapes = remove_channels(model, plain, removed)
    sync_heads(model)
    return shapes


def _half(groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Every other channel of every prunable group (odd ones: offsets and inner spans both matter)."""
    return {g.name: torch.arange(1, g.size, 2) for g in groups if g.prunable}


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], int, int, int, int]] = {
    # builder, inputs, heads groups, heads per group, MLP groups, neurons per group
    "vit": (_vit, _pixels, 2, 4, 2, 128),
    "gpt2": (_gpt2, _ids, 2, 4, 2, 256),
    "llama": (_llama, _ids, 2, 2, 2, 128),  # 2 key/value groups of 2 query heads each
    "tinyvit": (_tiny_vit, _images, 2, 4, 2, 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_groups_cut_masked_equals_physical_and_replays(case: str) -> None:
    build, inputs, n_heads, heads, n_mlp, neurons = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    reference = _run(model, x)
    record = prepare_transformer(model)
    assert torch.allclose(_run(model, x), reference, atol=1e-5)  # the swaps keep outputs
    groups = transformer_groups(model)
    head_groups = [g for g in groups if g.kind == "head" and g.prunable]
    mlp_groups = [g for g in groups if g.kind == "neuron" and g.prunable]
    assert [g.size for g in head_groups] == [heads] * n_heads
    assert [g.size for g in mlp_groups] == [neurons] * n_mlp
    assert any(g.frozen == RESIDUAL_REASON for g in groups)
    removed = _half(groups)

    masked = copy.deepcopy(model)
    mask_channels(masked, groups, removed)
    expected = _run(masked, x)
    assert not torch.allclose(expected, reference, atol=1e-3)  # the cut changed something
    before = sum(p.numel() for p in model.parameters())
    shapes = _cut(model, groups, removed)
    assert sum(p.numel() for p in model.parameters()) < before
    after = transformer_groups(model)
    assert [g.size for g in after if g.kind == "head" and g.prunable] == [heads // 2] * n_heads
    assert [g.size for g in after if g.kind == "neuron" and g.prunable] == [neurons // 2] * n_mlp
    torch.testing.assert_close(_run(model, x), expected, atol=1e-5, rtol=1e-5)

    torch.manual_seed(1)
    fresh = build().eval()
    replay_prepare(fresh, record)
    resize_layers(fresh, shapes)
    sync_heads(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_run(fresh, x), expected, atol=1e-5, rtol=1e-5)


def test_head_counts_follow_the_cut() -> None:
    torch.manual_seed(0)
    model = _gpt2().eval()
    prepare_transformer(model)
    groups = transformer_groups(model)
    _cut(model, groups, {"transformer.h.0.attn.heads": torch.tensor([0, 2, 3])})
    attention = model.get_submodule("transformer.h.0.attn")
    assert (attention.num_heads, attention.split_size) == (1, 16)
    assert model.get_submodule("transformer.h.1.attn").split_size == 64  # the other layer keeps its heads
    assert model.config.n_head == 4  # the shared config is left as built


def test_llama_cut_removes_a_key_value_head_with_its_query_heads() -> None:
    torch.manual_seed(0)
    model = _llama().eval()
    groups = transformer_groups(model)
    _cut(model, groups, {"model.layers.0.self_attn.heads": torch.tensor([0])})
    attention = model.get_submodule("model.layers.0.self_attn")
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (32, 16, 32)
    assert attention.num_key_value_groups == 2


def test_unprepared_layers_are_frozen_with_reasons() -> None:
    torch.manual_seed(0)
    gpt2 = _gpt2()
    assert is_transformer(gpt2) and is_transformer(_tiny_vit())
    assert not is_transformer(_user_models().TimeSeriesCNN())  # CNNs stay with the traced analysis
    frozen = {g.name: g.frozen for g in transformer_groups(gpt2)}
    assert "Conv1D" in frozen["transformer.h.0.attn.heads"] and "Conv1D" in frozen["transformer.h.0.mlp.neurons"]
    block = nn.Sequential(nn.MultiheadAttention(16, 2, add_bias_kv=True))
    assert prepare_transformer(block)["split_attention"] == []  # refused, left as it is
    assert "add_bias_kv" in transformer_groups(block)[0].frozen


def test_shared_layer_and_unknown_attention_are_frozen() -> None:
    shared = nn.Linear(8, 16)

    class OddAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

    model = nn.Sequential(nn.Sequential(shared, nn.GELU(), nn.Linear(16, 8)), nn.Sequential(shared), OddAttention())
    groups = {g.name: g for g in transformer_groups(model)}
    assert "shared weights" in groups["0.neurons"].frozen
    assert "OddAttention" in groups["2.heads"].frozen
    # a ReLU-free stack with a parameterized layer between the Linears is no MLP pattern
    assert transformer_groups(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4))) == []


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_equals_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=12).eval()
    split = split_multihead_attention(mha)
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn(2, 7, 12) if batch_first else torch.randn(7, 2, 12)
    padding = torch.zeros(2, 7)
    padding[0, -3:] = float("-inf")
    attn_mask = torch.randn(5, 7)
    for need_weights in (True, False):
        want = mha(q, kv, kv, key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
        got = split(q, kv, kv, key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_split_attention_refuses_stale_per_head_masks() -> None:
    split = SplitMultiheadAttention(16, 2, 8, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ConfigError, match="per-head masks"):
        split(x, x, x, attn_mask=torch.zeros(2 * 4, 5, 5))


def test_replay_prepare_names_a_mismatched_record() -> None:
    with pytest.raises(ModelFormatError, match="Conv1D layer 'lm_head'"):
        replay_prepare(_gpt2(), {"linear_from_conv1d": ["lm_head"]})


@pytest.mark.parametrize("build", [_vit, _gpt2, _llama], ids=["vit", "gpt2", "llama"])
def test_the_prune_verb_cuts_transformers_models_and_they_save_and_reload(build, tmp_path) -> None:
    import nnopt

    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32) if build is _vit else torch.randint(0, 100, (2, 8))
    pruned = nnopt.prune(model, nnopt.StructuredPruneConfig(ratio=0.5, head_ratio=0.5, importance="l1"))
    assert sum(p.numel() for p in pruned.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    nnopt.save_model(pruned, tmp_path / "m", factory=build)  # a transformers model needs its config: a factory
    again = nnopt.load_model(tmp_path / "m", factory=build)
    with torch.inference_mode():
        assert torch.equal(again(x).logits, pruned(x).logits)
