"""nnopt.llm.speed: decode/prefill tokens/s, copy bandwidth, weight bytes per token, weight-only variants."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nnopt.errors import ConfigError
from nnopt.layers.weight_only import QuantizedLinear
from nnopt.llm import speed
from nnopt.quantization.weights import WeightQuantConfig

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 256


def _tiny(tie: bool = False) -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                      max_position_embeddings=256, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny() -> Any:
    return _tiny()


def test_greedy_decode_matches_generate(tiny: Any) -> None:
    prompt = speed.random_prompt(tiny, 7, seed=3)
    ours = speed.greedy_decode(tiny, prompt, 12)
    with torch.inference_mode():
        theirs = tiny.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               attention_mask=torch.ones_like(prompt))
    assert ours.shape == (1, 12)
    assert torch.equal(ours, theirs[:, prompt.shape[1]:])


def test_rates_are_positive_and_alternated(tiny: Any) -> None:
    decode = speed.compare_decode({"a": tiny, "b": tiny}, prompt_tokens=4, new_tokens=5, rounds=3)
    prefill = speed.compare_prefill({"a": tiny}, tokens=32, rounds=2)
    assert set(decode) == {"a", "b"} and len(decode["a"].samples) == 3
    for rate in (*decode.values(), *prefill.values()):
        assert rate.median > 0 and rate.p10 <= rate.median <= rate.p90
    bandwidth = speed.copy_bandwidth(8 << 20, rounds=3, warmup=1)
    assert 1e8 < bandwidth.median < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s


def test_weight_bytes_by_hand() -> None:
    kv = KV_HEADS * HIDDEN // HEADS
    per_layer = HIDDEN * HIDDEN * 2 + kv * HIDDEN * 2 + 3 * HIDDEN * INTER  # q, o; k, v; gate, up, down
    expected = 4 * (LAYERS * per_layer + VOCAB * HIDDEN + HIDDEN)  # + lm_head + one embedding row
    assert speed.weight_bytes_per_token(_tiny()) == expected
    assert speed.weight_bytes_per_token(_tiny(tie=True)) == expected  # a tied lm_head is still read whole


def test_weight_bytes_of_int4_groups(tiny: Any) -> None:
    q = speed.quantized_copy(tiny, WeightQuantConfig(bits=4, group_size=32))
    linear_weights = sum(m.weight.numel() for m in tiny.modules() if type(m) is torch.nn.Linear)
    # two codes per byte, one float32 scale per 32 inputs, plus the float32 embedding row
    assert speed.weight_bytes_per_token(q) == linear_weights // 2 + linear_weights // 32 * 4 + HIDDEN * 4


def test_quantized_copy_shares_and_is_close(tiny: Any) -> None:
    prompt = speed.random_prompt(tiny, 16, seed=1)
    with torch.inference_mode():
        ref = tiny(prompt).logits
    for config, tolerance in ((WeightQuantConfig(bits=8, per_channel=True), 0.03),
                              (WeightQuantConfig(bits=4, group_size=32), 0.3)):
        q: Any = speed.quantized_copy(tiny, config)
        assert isinstance(q.lm_head, QuantizedLinear) and type(tiny.lm_head) is torch.nn.Linear  # source unchanged
        assert q.model.embed_tokens.weight is tiny.model.embed_tokens.weight  # shared, not copied
        choices = speed.choose_kernels(tiny, q, rounds=1)
        assert {c.shape for c in choices} == {(HIDDEN, HIDDEN), (32, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER),
                                              (VOCAB, HIDDEN)}
        assert {c.shape: c.layers for c in choices}[(HIDDEN, HIDDEN)] == 2 * LAYERS  # q_proj and o_proj
        assert all(c.timed_layers == 1 for c in speed.choose_kernels(tiny, q, rounds=1, max_layers=1))
        for choice in choices:
            assert choice.chosen in choice.ms and choice.ms[choice.chosen] == min(
                v for k, v in choice.ms.items() if k != "fp32")
        with torch.inference_mode():
            out = q(prompt).logits
        error = float((out - ref).norm() / ref.norm())
        assert 0 < error < tolerance


def test_lm_head_can_stay_float(tiny: Any) -> None:
    q: Any = speed.quantized_copy(tiny, WeightQuantConfig(bits=8, per_channel=True), include_lm_head=False)
    assert q.lm_head.weight is tiny.lm_head.weight
    assert isinstance(q.model.layers[0].mlp.down_proj, QuantizedLinear)


def test_bad_input(tiny: Any) -> None:
    with pytest.raises(ConfigError):
        speed.compare_decode({"a": tiny}, new_tokens=0)
    with pytest.raises(ConfigError):
        speed.compare_prefill({}, tokens=8)
    with pytest.raises(ConfigError):
        speed.copy_bandwidth(0)
    with pytest.raises(ConfigError):
        speed.greedy_decode(tiny, torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ConfigError):
        speed.quantized_copy(tiny, {"bits": 4})
    with pytest.raises(ConfigError):
        speed.compare_decode({"mlp": torch.nn.Linear(2, 2)}, new_tokens=2)  # no config.vocab_size
    with pytest.raises(ConfigError):
        speed.bandwidth_fraction(100, 0.0, 1e9)
    assert speed.bandwidth_fraction(1000, 2.0, 4000.0) == 0.5
