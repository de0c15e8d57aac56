"""oneDNN int8 path and the BERT-layer rewrites: each equals the unfused computation."""

from __future__ import annotations

import copy

import pytest
import torch

import nnopt
from nnopt import cpu, envinfo
from nnopt.errors import ConfigError
from nnopt.layers import kernels as K
from nnopt.layers.int8 import Int8DynamicLinear
from nnopt.quantization import encoder_fusion

needs_onednn = pytest.mark.skipif(not K.onednn_int8_exact(), reason="oneDNN's int8 Linear is missing from this torch "
                                  "build or failed its known-answer check on this CPU (no VNNI)")


def _int8_linear(in_features: int = 48, out_features: int = 24, smoothing: bool = False) -> Int8DynamicLinear:
    torch.manual_seed(0)
    source = torch.nn.Linear(in_features, out_features)
    module = Int8DynamicLinear(source, smoothing=smoothing)
    module.set_weight(source.weight.detach())
    if smoothing:
        module.input_smoothing.copy_(torch.rand(in_features) + 0.5)
    return module.eval()


def _without_onednn(module: Int8DynamicLinear, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, **kw):
    with monkeypatch.context() as patch:
        patch.setattr(K, "onednn_int8_available", lambda: False)
        return module(x, **kw)


@needs_onednn
@pytest.mark.parametrize("smoothing", [False, True])
def test_onednn_path_equals_int_mm_path(smoothing, monkeypatch):
    module = _int8_linear(smoothing=smoothing)
    x = torch.randn(3, 5, 48) * 4
    fast, reference = module(x), _without_onednn(module, x, monkeypatch)
    assert fast.shape == (3, 5, 24)
    # same int8 codes in both; only float rounding of the epilogue (and of ties) may differ
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=2e-3)


@needs_onednn
def test_fused_gelu_and_residual_equal_separate_ops(monkeypatch):
    module = _int8_linear()
    x, residual = torch.randn(16, 48), torch.randn(16, 24)
    plain = module(x)
    assert torch.allclose(module(x, residual=residual), plain + residual, atol=1e-5)
    module.activation = "gelu"
    torch.testing.assert_close(module(x), torch.nn.functional.gelu(plain), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_without_onednn(module, x, monkeypatch), module(x), rtol=1e-4, atol=2e-3)


def test_bf16_output_and_bf16_input():
    module = _int8_linear()
    x = torch.randn(8, 48)
    reference = module(x)
    module.output_dtype = torch.bfloat16
    out = module(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=2e-2)
    module.output_dtype = torch.float32
    torch.testing.assert_close(module(x.bfloat16()), module(x.bfloat16().float()))


def test_copies_pack_again_and_agree():
    module = _int8_linear()
    x = torch.randn(4, 48)
    before = module(x)  # packs the oneDNN weight (an opaque tensor that cannot be copied)
    twin = copy.deepcopy(module)
    assert torch.equal(twin(x), before)
    with torch.no_grad():
        twin.weight_q.neg_()
    twin.refresh()  # new codes: the packed copy is dropped
    assert torch.allclose(twin(x), -before + 2 * module.bias, atol=1e-3)


def test_shared_codes_are_reused_only_for_the_same_unchanged_input():
    shared = K.SharedInputCodes(3)
    x, smoothing = torch.randn(4, 8), torch.ones(8)
    codes = K.quantize_activation_u8(x)
    shared.store(x, smoothing, codes)
    assert shared.lookup(x.clone(), smoothing) is None  # another tensor
    assert shared.lookup(x, smoothing * 2) is None  # another smoothing
    assert shared.lookup(x, None) is None
    assert shared.lookup(x, smoothing.clone()) is codes
    x.add_(1.0)  # modified in place: version counter moved
    assert shared.lookup(x, smoothing) is None


def test_shared_codes_are_freed_after_every_member_read_them():
    shared = K.SharedInputCodes(2)
    x = torch.randn(4, 8)
    shared.store(x, None, K.quantize_activation_u8(x))
    assert shared.lookup(x, None) is not None
    assert shared.lookup(x, None) is None  # both members have read it


# --------------------------------------------------------------------------- a small BERT


@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 50, (4, 12), generator=gen)} for _ in range(2)]
    return model, data


def _hidden(model, batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state


def test_bert_rewrites_are_exact(tiny_bert, monkeypatch):
    model, data = tiny_bert
    config = nnopt.DynamicQuantConfig(smoothing=0.5, embeddings=False)
    fused = nnopt.quantize(model, config, data=data)
    layer = fused.encoder.layer[0]
    assert isinstance(layer.output, encoder_fusion.ResidualOutput)
    assert isinstance(layer.attention.output, encoder_fusion.ResidualOutput)
    assert layer.intermediate.dense.activation == "gelu"
    assert not layer.attention.output.dense.smoothing  # moved into the value projection

    # Reference: the same calibration (one s for q, k, v) without any rewrite but the exact sharing.
    real_plan = encoder_fusion.plan_fusions

    def sharing_only(*args, **kwargs):
        full = real_plan(*args, **kwargs)
        return {"shared_input": full["shared_input"]}

    monkeypatch.setattr("nnopt.quantization.ptq.plan_fusions", sharing_only)
    unfused = nnopt.quantize(model, config, data=data)
    assert unfused.encoder.layer[0].attention.output.dense.smoothing
    for batch in data:
        torch.testing.assert_close(_hidden(fused, batch), _hidden(unfused, batch), rtol=1e-4, atol=1e-4)


def test_bf16_attention_stays_close(tiny_bert):
    model, data = tiny_bert
    config = nnopt.DynamicQuantConfig(smoothing=0.5, embeddings=False, attention_dtype="bfloat16")
    native, why = envinfo.bf16_support()
    if native is False:  # an AVX2 CPU, or ONEDNN_MAX_CPU_ISA=AVX2: refused at once, naming why
        with pytest.raises(nnopt.NnoptError, match="needs native bf16"):
            nnopt.quantize(model, config, data=data)
        return
    quantized = nnopt.quantize(model, config, data=data)
    assert quantized.encoder.layer[0].attention.self.query.output_dtype == torch.bfloat16
    reference = _hidden(model, data[0])
    out = _hidden(quantized, data[0])
    cosine = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).min()
    assert out.dtype == torch.float32 and cosine > 0.99


def test_attention_dtype_is_checked():
    with pytest.raises(ConfigError, match="attention_dtype"):
        nnopt.DynamicQuantConfig(attention_dtype="float16")


def test_bf16_attention_replayed_on_a_cpu_without_bf16_runs_in_float32(tiny_bert, monkeypatch):
    """Loading replays the recorded plan; where bf16 would be emulated the attention stays float32, with one
    warning line that says why."""
    model, data = tiny_bert
    quantized = nnopt.quantize(model, nnopt.DynamicQuantConfig(smoothing=0.5, embeddings=False), data=data)
    targets = {name for name, m in quantized.named_modules() if isinstance(m, Int8DynamicLinear)}
    plan = encoder_fusion.plan_fusions(model, targets, attention_bf16=True)
    assert plan["bf16_attention"]
    query = quantized.encoder.layer[0].attention.self.query
    with monkeypatch.context() as patch:
        patch.setattr(cpu, "bf16_support", lambda device="cpu": (False, "the CPU has neither AVX-512 BF16 nor "
                                                                            "AMX-BF16"))
        with pytest.warns(UserWarning, match="bf16 attention runs in float32 on this machine: the CPU has neither"):
            encoder_fusion.apply_fusions(quantized, {"bf16_attention": plan["bf16_attention"]}, fold_values=False)
    assert query.output_dtype == torch.float32
    with monkeypatch.context() as patch:
        patch.setattr(cpu, "bf16_support", lambda device="cpu": (True, "the CPU has AVX-512 BF16"))
        encoder_fusion.apply_fusions(quantized, {"bf16_attention": plan["bf16_attention"]}, fold_values=False)
    assert query.output_dtype == torch.bfloat16
