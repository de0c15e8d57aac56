"""Smoothing-scale folding, AWQ and SmoothQuant W8A8 on the layer-by-layer engine (tiny random Llamas)."""

import json

import pytest
import torch
from checkpoint_files import checkpoint_tensors as _tensors
from safetensors import safe_open
from safetensors.torch import save_file

from nnopt.errors import ConfigError
from nnopt.llm import smoothing
from nnopt.llm.awq import AWQConfig, clip_codes, codes_with_ratio, quantize_checkpoint_awq, search_scales
from nnopt.llm.gptq import hessian
from nnopt.llm.layerwise import CalibrationConfig
from nnopt.llm.smoothquant import (
    ACTIVATION_SCHEME,
    SmoothQuantConfig,
    fake_quant_activations,
    quantize_checkpoint_smoothquant,
    quantize_per_token,
    smoothing_scales,
)
from nnopt.llm.streaming import dequantize_rtn, partial_dir, quantize_checkpoint_rtn, rtn_codes
from nnopt.llm.synthetic import LlamaShape, write_synthetic_llama
from nnopt.quantization.weights import WeightQuantConfig

transformers = pytest.importorskip("transformers")

# 4 heads, 4 kv heads: v_proj → o_proj folds too (the GQA case is covered on single layers below)
SHAPE = LlamaShape(96, 160, 2, 4, 4, 128, "float32", max_position_embeddings=64)
TOKENS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
INT4 = WeightQuantConfig(bits=4, group_size=32)


@pytest.fixture(scope="module")
def outlier_dir(tmp_path_factory):
    """A tiny Llama whose norms make a few loud input channels, as trained LLMs have (the case AWQ and
    SmoothQuant are for); one shard, rewritten in place."""
    path = tmp_path_factory.mktemp("llm") / "tiny"
    write_synthetic_llama(path, SHAPE, seed=3)
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    g = torch.Generator().manual_seed(5)
    for name in tensors:
        if name.endswith("layernorm.weight"):
            loud = torch.randperm(SHAPE.hidden_size, generator=g)[:4]
            tensors[name][loud] = 12.0
        if name.endswith("up_proj.weight"):
            tensors[name][torch.randperm(SHAPE.intermediate_size, generator=g)[:4]] *= 15
    save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def _layer(model_type, kv_heads, seed=0):
    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=["_"])
    stem = {"llama": "Llama", "qwen2": "Qwen2"}[model_type]
    config = getattr(transformers, f"{stem}Config")(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                                    num_key_value_heads=kv_heads)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = getattr(module, f"{stem}DecoderLayer")(config, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    rotary = getattr(module, f"{stem}RotaryEmbedding")(config=config)
    return layer, rotary


def _run(layer, rotary, x):
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out = layer(x, attention_mask=mask, position_embeddings=rotary(x, torch.arange(x.shape[1])[None]))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("model_type,kv_heads,producers", [
    ("llama", 4, ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]),
    ("llama", 2, ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]),  # GQA: no v → o
    ("qwen2", 4, ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]),  # v bias
], ids=["llama", "llama-gqa", "qwen2-bias"])
def test_folded_scales_keep_the_float_layer_and_move_the_magnitude(model_type, kv_heads, producers):
    layer, rotary = _layer(model_type, kv_heads)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    before = _run(layer, rotary, x)
    groups = smoothing.scale_groups(layer)
    assert [g.producer for g in groups] == producers
    g = torch.Generator().manual_seed(2)
    q_before = layer.self_attn.q_proj.weight.clone()
    scales = {}
    for group in groups:
        scales[group.producer] = torch.rand(layer.get_submodule(group.consumers[0]).in_features, generator=g) * 8 + 0.1
        smoothing.fold_scales(layer, group, scales[group.producer])
    after = _run(layer, rotary, x)
    assert float((after - before).abs().max()) < 1e-5 * float(before.abs().max())
    # the weights did change: columns scaled by the input_layernorm group's scales
    torch.testing.assert_close(layer.self_attn.q_proj.weight, q_before * scales["input_layernorm"])
    with pytest.raises(ConfigError, match="positive and finite"):
        smoothing.fold_scales(layer, groups[0], -torch.ones(32))
    with pytest.raises(ConfigError, match="3 values for 32 inputs"):
        smoothing.fold_scales(layer, groups[0], torch.ones(3))


def _outlier_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d ** 0.5)
    x[:, torch.randperm(d, generator=g)[:6]] *= 20  # loud channels
    return x, torch.randn(64, d, generator=g) * 0.05


def _true_error(w, deq, x):
    return float(((deq - w) @ x.t()).pow(2).sum()) * 2 / x.shape[0]


@pytest.mark.parametrize("config", [INT4, WeightQuantConfig(bits=4, group_size=32, symmetric=False),
                                    WeightQuantConfig(bits=3, per_channel=True)],
                         ids=["int4-g32", "int4-g32-asym", "int3-channel"])
def test_awq_scales_cut_the_output_error_measured_on_the_inputs_themselves(config):
    x, w = _outlier_inputs()
    found = search_scales([w], hessian(x), config, AWQConfig(grid=20, clip=False))
    s = found.scales
    scaled_codes = rtn_codes(w * s, config)
    awq_deq = dequantize_rtn(*scaled_codes, config.group_size) / s
    rtn_deq = dequantize_rtn(*rtn_codes(w, config), config.group_size)
    awq_err, rtn_err = _true_error(w, awq_deq, x), _true_error(w, rtn_deq, x)
    # the search's Hessian figures are the output errors on the inputs (tr(ΔW H ΔWᵀ) = 2/n ‖ΔW Xᵀ‖²)
    assert found.rtn_error == pytest.approx(rtn_err, rel=1e-3)
    assert found.error == pytest.approx(awq_err, rel=1e-2)
    assert found.alpha is not None and awq_err < 0.7 * rtn_err, (awq_err, rtn_err)
    # duo scaling also never loses to RTN on this measure
    assert search_scales([w], hessian(x), config, AWQConfig(duo_scaling=True)).error <= rtn_err * 1.001


def test_clip_search_keeps_the_layout_and_a_ratio_of_one_is_rtn():
    x, w = _outlier_inputs(d=80)  # groups of 32: a partial last group of 16
    for config in (INT4, WeightQuantConfig(bits=4, group_size=32, symmetric=False),
                   WeightQuantConfig(bits=4, per_channel=True)):
        ones = torch.ones(64, 3 if config.group_size else 1)
        exact = codes_with_ratio(w, ones, config)
        assert all(torch.equal(a, b) for a, b in zip(exact, rtn_codes(w, config), strict=True))
        codes, step, zero = clip_codes(w, hessian(x), config)
        assert codes.dtype == torch.int8 and step.shape == ones.shape and zero.dtype == torch.int8
        clipped = _true_error(w, dequantize_rtn(codes, step, zero, config.group_size), x)
        plain = _true_error(w, dequantize_rtn(*exact, config.group_size), x)
        assert clipped < plain, (config, clipped, plain)
        assert not torch.equal(codes, exact[0])



def _expected_model(src_dir, out_dir, bits):
    """The source model with every tensor the output holds: dequantized codes for quantized matrices, and
    the norms (and any other tensor) as written, i.e. nnopt's own expectation of the output."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model = transformers.LlamaForCausalLM.from_pretrained(src_dir).eval()
    stored = _tensors(out_dir)
    state = model.state_dict()
    for key in state:
        base = key.removesuffix(".weight")
        if f"{base}.weight_packed" in stored:
            shape = tuple(stored[f"{base}.weight_shape"].tolist())
            codes = unpack_from_int32(stored[f"{base}.weight_packed"], bits, torch.Size(shape))
            scale = stored[f"{base}.weight_scale"]
            state[key] = codes.float() * scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
        elif key in stored:
            state[key] = stored[key].float()
    model.load_state_dict(state)
    return model


def test_awq_checkpoint_loads_equals_its_expectation_and_beats_rtn(outlier_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    awq = AWQConfig(grid=10)
    result = quantize_checkpoint_awq(outlier_dir, tmp_path / "awq", INT4, awq=awq, tokens=TOKENS)
    assert result["calibrated_layers"] == 2 and result["quantized_tensors"] == 14
    assert len(result["awq_groups"]) == 8 and all(g["error"] <= g["rtn_error"] for g in result["awq_groups"])
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc["version"] == "nnopt-awq" and not list(tmp_path.glob(".*partial"))
    written = _tensors(tmp_path / "awq")
    with safe_open(str(outlier_dir / "model.safetensors"), framework="pt") as fh:
        norm = fh.get_tensor("model.layers.0.input_layernorm.weight")
    assert not torch.equal(written["model.layers.0.input_layernorm.weight"], norm)  # absorbed 1 / s
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "awq").eval()
    expected = _expected_model(outlier_dir, tmp_path / "awq", 4)
    fp32 = transformers.LlamaForCausalLM.from_pretrained(outlier_dir).eval()
    quantize_checkpoint_rtn(outlier_dir, tmp_path / "rtn", INT4)
    rtn = _expected_model(outlier_dir, tmp_path / "rtn", 4)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
        target = fp32(TOKENS).logits
        awq_err = float((expected(TOKENS).logits - target).norm())
        rtn_err = float((rtn(TOKENS).logits - target).norm())
    assert awq_err < 0.9 * rtn_err, (awq_err, rtn_err)


def test_smoothquant_is_w8a8_in_transformers_and_carries_what_the_model_computes(outlier_dir, tmp_path):
    pytest.importorskip("compressed_tensors")

    def stop_after_one_layer(done, total, unit):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint_smoothquant(outlier_dir, tmp_path / "sq", tokens=TOKENS, progress=stop_after_one_layer)
    with safe_open(str(partial_dir(tmp_path / "sq") / "carried-1.safetensors"), framework="pt") as fh:
        carried = fh.get_tensor("hidden")
    result = quantize_checkpoint_smoothquant(outlier_dir, tmp_path / "sq", tokens=TOKENS)
    assert result["resumed_units"] == 1 and result["method"] == "nnopt-smoothquant"
    qc = json.loads((tmp_path / "sq" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["input_activations"] == ACTIVATION_SCHEME
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sq").eval()
    expected = _expected_model(outlier_dir, tmp_path / "sq", 8)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        weights_only = expected(ids).logits
        handles = fake_quant_activations(expected)
        assert len(handles) == 14
        w8a8 = expected(ids).logits
        # transformers + compressed-tensors round every Linear input per token, as nnopt's hooks do
        torch.testing.assert_close(loaded(ids).logits, w8a8, rtol=1e-5, atol=1e-5)
        assert float((w8a8 - weights_only).abs().max()) > 1e-3
        # the calibration carried layer 1 the inputs the W8A8 model computes there
        hidden = loaded(TOKENS, output_hidden_states=True).hidden_states[1]
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(carried, hidden, rtol=1e-4, atol=1e-4)


def test_smoothquant_scales_and_per_token_rounding():
    absmax = torch.tensor([4.0, 1.0, 0.0])
    weights = [torch.tensor([[1.0, 0.5, 2.0]]), torch.tensor([[-0.25, -2.0, 0.0]])]
    s = smoothing_scales(absmax, weights, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, (1 / 2.0) ** 0.5, 1.0], dtype=torch.float64))
    x = torch.tensor([[[1.0, -2.55, 0.3], [0.0, 0.0, 0.0]]])
    q = quantize_per_token(x)
    step = 2.55 / 127.5
    assert torch.equal(q[0, 1], torch.zeros(3))
    torch.testing.assert_close(q[0, 0], torch.round(torch.tensor([1.0, -2.55, 0.3]) / step) * step)


def test_bad_configs_are_refused(outlier_dir, tmp_path):
    for bad, match in [(AWQConfig(grid=1), "grid"), (AWQConfig(clip_grid=0), "clip_grid"),
                       (AWQConfig(max_shrink=1.0), "max_shrink"), (AWQConfig(clip="yes"), "clip")]:
        with pytest.raises(ConfigError, match=match):
            quantize_checkpoint_awq(outlier_dir, tmp_path / "x", INT4, awq=bad, tokens=TOKENS)
    for bad, match in [(SmoothQuantConfig(alpha=1.5), "alpha"), (SmoothQuantConfig(alpha=True), "alpha"),
                       (SmoothQuantConfig(fold_linear_producers=1), "fold_linear_producers")]:
        with pytest.raises(ConfigError, match=match):
            quantize_checkpoint_smoothquant(outlier_dir, tmp_path / "x", smooth=bad, tokens=TOKENS)
    with pytest.raises(ConfigError, match="bits"):
        quantize_checkpoint_awq(outlier_dir, tmp_path / "x", WeightQuantConfig(bits=1), tokens=TOKENS)
    with pytest.raises(ConfigError, match="AWQ needs"):
        search_scales([torch.zeros(4, 8)], torch.eye(6), INT4)
    with pytest.raises(ConfigError, match="windows"):
        quantize_checkpoint_awq(outlier_dir, tmp_path / "x", INT4, tokens=TOKENS,
                                calibration=CalibrationConfig(windows=0))
    with pytest.raises(ConfigError, match="no module"):
        fake_quant_activations(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["nope"])
    assert not (tmp_path / "x").exists()
