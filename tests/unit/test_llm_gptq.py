"""GPTQ for one matrix and the layer-by-layer calibration pipeline (tiny random Llama models only)."""

import json

import pytest
import torch
from checkpoint_files import checkpoint_tensors as _tensors
from safetensors import safe_open

from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.layers import primitives as P
from nnopt.llm.gptq import (
    GPTQConfig,
    gptq_codes,
    gptq_codes_consuming,
    gptq_codes_from_inverse,
    hessian,
    hessian_inverse,
)
from nnopt.llm.layerwise import (
    CalibrationConfig,
    _add_gram_upper,
    _mirror_upper,
    quantize_checkpoint_gptq,
    quantize_checkpoint_layerwise,
)
from nnopt.llm.streaming import dequantize_rtn, partial_dir, quantize_checkpoint_rtn, rtn_codes
from nnopt.llm.synthetic import LlamaShape, write_synthetic_llama
from nnopt.quantization.weights import WeightQuantConfig

# hidden 96 and intermediate 160: groups of 64 leave partial last groups (96 = 64 + 32, 160 = 2·64 + 32).
SHAPE = LlamaShape(96, 160, 2, 4, 2, 128, "float32", max_position_embeddings=64)
TOKENS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny"
    write_synthetic_llama(path, SHAPE, seed=3, shard_bytes=60_000)
    return path


def _correlated(n=1024, d=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3
    x[:, 7] = 0  # a dead input
    return x, torch.randn(48, d, generator=g) * 0.02


def _output_error(w, x, codes, group):
    return float(((w - dequantize_rtn(*codes, group)) @ x.t()).norm())


@pytest.mark.parametrize("config,gptq", [
    (WeightQuantConfig(bits=4, group_size=64), GPTQConfig()),
    (WeightQuantConfig(bits=4, group_size=64, symmetric=False), GPTQConfig(block=32)),
    (WeightQuantConfig(bits=4, per_channel=True), GPTQConfig(act_order=True)),
    (WeightQuantConfig(bits=8, per_channel=True), GPTQConfig()),
    (WeightQuantConfig(bits=4), GPTQConfig()),
], ids=["int4-g64", "int4-g64-asym-block32", "int4-channel-actorder", "int8-channel", "int4-tensor"])
def test_gptq_beats_rtn_on_the_output_and_keeps_the_stored_layout(config, gptq):
    x, w = _correlated()
    codes, step, zero = gptq_codes(w, hessian(x), config, gptq)
    rtn = rtn_codes(w, config)
    assert codes.shape == rtn[0].shape and codes.dtype == torch.int8
    assert step.shape == rtn[1].shape and step.dtype == torch.float32
    assert zero.shape == rtn[2].shape and zero.dtype == torch.int8
    qmin, qmax = P.qrange(config.bits, config.symmetric)
    assert qmin <= int(codes.min()) and int(codes.max()) <= qmax
    # the dead input's weight became exactly 0
    assert bool((dequantize_rtn(codes, step, zero, config.group_size)[:, 7] == 0).all())
    gptq_error = _output_error(w, x, (codes, step, zero), config.group_size)
    rtn_error = _output_error(w, x, rtn, config.group_size)
    assert gptq_error < 0.85 * rtn_error, (gptq_error, rtn_error)


def test_gptq_group_scales_come_from_the_updated_weights_and_bound_every_code():
    x, w = _correlated(d=160)
    config = WeightQuantConfig(bits=4, group_size=64)
    codes, step, zero = gptq_codes(w, hessian(x), config)
    assert step.shape == (48, 3)  # 64 + 64 + a partial 32
    # Each group's codes use the range: some code reaches the edge of the symmetric grid in every group.
    for g in range(3):
        assert int(codes[:, g * 64:(g + 1) * 64].abs().max()) == 7


def test_gptq_refusals():
    x, w = _correlated()
    h = hessian(x)
    with pytest.raises(ConfigError, match="act_order with group_size"):
        gptq_codes(w, h, WeightQuantConfig(bits=4, group_size=64), GPTQConfig(act_order=True))
    with pytest.raises(ConfigError, match="Hessian must be"):
        gptq_codes(w, h[:10, :10], WeightQuantConfig(bits=4))
    with pytest.raises(ConfigError, match="NaN"):
        gptq_codes(w, h * float("nan"), WeightQuantConfig(bits=4))
    with pytest.raises(ConfigError, match="damp"):
        gptq_codes(w, h, WeightQuantConfig(bits=4), GPTQConfig(damp=0))
    with pytest.raises(ConfigError, match="exceeds the input dimension"):
        gptq_codes(w, h, WeightQuantConfig(bits=4, group_size=256))
    with pytest.raises(ConfigError, match="bits"):
        gptq_codes(w, h, WeightQuantConfig(bits=1))



def _dequantized_model(tiny_dir, out_dir, config):
    """The source model with each quantized matrix replaced by the dequantized codes the output holds."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    stored = _tensors(out_dir)
    state = model.state_dict()
    for key in state:
        base = key.removesuffix(".weight")
        if f"{base}.weight_packed" in stored:
            shape = tuple(stored[f"{base}.weight_shape"].tolist())
            codes = unpack_from_int32(stored[f"{base}.weight_packed"], config.bits, torch.Size(shape))
            scale = stored[f"{base}.weight_scale"]
            width = shape[1] // scale.shape[1]
            state[key] = codes.float() * scale.repeat_interleave(width, dim=1)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("config", [WeightQuantConfig(bits=4, group_size=64),
                                    WeightQuantConfig(bits=8, per_channel=True)],
                         ids=["int4-g64-partial", "int8-channel"])
def test_gptq_checkpoint_loads_in_transformers_and_equals_its_dequantized_codes(tiny_dir, tmp_path, config):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    seen = []
    result = quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS,
                                      calibration=CalibrationConfig(batch=4), progress=lambda *a: seen.append(a))
    assert result["calibrated_layers"] == 2 and result["quantized_tensors"] == 14 and result["peak_rss_bytes"] > 0
    assert result["calibration_tokens"] == TOKENS.numel() and seen[0][2] == "model.layers.0"
    assert not list(tmp_path.glob(".*partial"))
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["version"] == "nnopt-gptq"
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "q").eval()
    reference = _dequantized_model(tiny_dir, tmp_path / "q", config)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    # GPTQ's codes differ from RTN's (calibrated), and bring the output closer to fp32 on the calibration tokens.
    quantize_checkpoint_rtn(tiny_dir, tmp_path / "rtn", config)
    rtn_model = _dequantized_model(tiny_dir, tmp_path / "rtn", config)
    fp32 = transformers.LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        target = fp32(TOKENS).logits
        gptq_err = float((reference(TOKENS).logits - target).norm())
        rtn_err = float((rtn_model(TOKENS).logits - target).norm())
    assert gptq_err < rtn_err, (gptq_err, rtn_err)


def test_carried_hidden_states_are_the_quantized_models_and_a_resumed_run_equals_a_fresh_one(tiny_dir, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    config = WeightQuantConfig(bits=4, group_size=32)

    def stop_after_one_layer(done, total, unit):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS, progress=stop_after_one_layer)
    partial = partial_dir(tmp_path / "q")
    progress = json.loads((partial / "nnopt-progress.json").read_text())
    assert progress["done_units"] == ["model.layers.0"] and progress["keep"] == ["carried-1.safetensors"]
    with safe_open(str(partial / "carried-1.safetensors"), framework="pt") as fh:
        carried = fh.get_tensor("hidden")
    resumed = quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS)
    assert resumed["resumed_units"] == 1 and resumed["calibrated_layers"] == 1 and not partial.exists()
    fresh = quantize_checkpoint_gptq(tiny_dir, tmp_path / "fresh", config, tokens=TOKENS)
    a, b = _tensors(tmp_path / "q"), _tensors(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh["calibrated_layers"] == 2
    # The carried inputs of layer 1 are what the whole quantized model computes there (mask, rotary, order).
    model = _dequantized_model(tiny_dir, tmp_path / "fresh", config)
    with torch.no_grad():
        hidden = model(TOKENS, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(carried, hidden, rtol=1e-4, atol=1e-5)
    # Other calibration tokens do not pick up this run's partial output.
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint_gptq(tiny_dir, tmp_path / "r", config, tokens=TOKENS, progress=stop_after_one_layer)
    other = quantize_checkpoint_gptq(tiny_dir, tmp_path / "r", config, tokens=TOKENS[:3])
    assert other["resumed_units"] == 0


def test_layerwise_with_rtn_as_the_algorithm_writes_what_streamed_rtn_writes(tiny_dir, tmp_path):
    config = WeightQuantConfig(bits=4, group_size=64, symmetric=False)
    quantize_checkpoint_layerwise(tiny_dir, tmp_path / "a", config, lambda name, w, h: rtn_codes(w, config),
                                  method="rtn-via-layerwise", settings={}, tokens=TOKENS)
    quantize_checkpoint_rtn(tiny_dir, tmp_path / "b", config)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layerwise_refusals(tiny_dir, tmp_path):
    config = WeightQuantConfig(bits=4, group_size=32)
    with pytest.raises(ConfigError, match="token ids must lie in"):
        quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS + 1000)
    with pytest.raises(ConfigError, match="calibration tokens must be"):
        quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS[0])
    with pytest.raises(ConfigError, match="no tokenizer files"):
        quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config)
    with pytest.raises(ConfigError, match="CalibrationConfig.windows"):
        quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS,
                                 calibration=CalibrationConfig(windows=0))
    with pytest.raises(ConfigError, match="act_order with group_size"):
        quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS, gptq=GPTQConfig(act_order=True))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UnsupportedModelError, match="supports model types"):
        quantize_checkpoint_gptq(gpt2, tmp_path / "q", config, tokens=TOKENS)
    with pytest.raises(ConfigError, match="leave the 4-bit range"):
        quantize_checkpoint_layerwise(tiny_dir, tmp_path / "bad", config,
                                      lambda name, w, h: (torch.full(w.shape, 9, dtype=torch.int8),
                                                          *rtn_codes(w, config)[1:]),
                                      method="broken", settings={}, tokens=TOKENS)


def test_a_layers_selection_that_skips_a_decoder_layer_still_carries_the_inputs_through_it(tiny_dir, tmp_path):
    """Layer 0 left float: its calibration inputs must still pass through it to reach layer 1."""
    config = WeightQuantConfig(bits=4, group_size=64, layers=(r"re:^model\.layers\.1\.",))
    result = quantize_checkpoint_gptq(tiny_dir, tmp_path / "q", config, tokens=TOKENS)
    assert result["quantized_tensors"] == 7 and result["calibrated_layers"] == 2
    written = _tensors(tmp_path / "q")
    assert "model.layers.0.mlp.up_proj.weight" in written and "model.layers.1.mlp.up_proj.weight_packed" in written


@pytest.mark.parametrize("config,gptq", [
    (WeightQuantConfig(bits=4, group_size=64), GPTQConfig()),
    (WeightQuantConfig(bits=4, per_channel=True), GPTQConfig(act_order=True)),
], ids=["int4-g64", "int4-channel-actorder"])
def test_gptq_in_the_hessians_memory_gives_the_same_codes_and_gptq_codes_leaves_its_hessian_alone(config, gptq):
    x, w = _correlated(d=600)  # wider than a tile of the in-place symmetrization (512)
    h = hessian(x)
    before = h.clone()
    codes = gptq_codes(w, h, config, gptq)
    assert torch.equal(h, before)
    work = h.clone()
    consumed = gptq_codes_consuming(w, work, config, gptq)
    assert all(torch.equal(a, b) for a, b in zip(codes, consumed, strict=True))
    assert torch.equal(work, before) == gptq.act_order  # act-order permutes a copy; otherwise H is the workspace
    # a Hessian that is not C-contiguous float64 is copied, never overwritten
    odd = before.t().contiguous().t()
    assert all(torch.equal(a, b) for a, b in zip(codes, gptq_codes_consuming(w, odd, config, gptq), strict=True))
    assert torch.equal(odd, before)
    # one inverse for every matrix fed the same inputs (q/k/v): each one's codes as gptq_codes gives them
    inverse = hessian_inverse(h, gptq)
    assert torch.equal(h, before)
    other = torch.randn(20, 600, generator=torch.Generator().manual_seed(5)) * 0.02
    for matrix in (w, other):
        expected = gptq_codes(matrix, h, config, gptq)
        got = gptq_codes_from_inverse(matrix, inverse, config, gptq)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_the_engines_tiled_gram_matrix_is_the_whole_product_and_symmetric():
    x = torch.randn(300, 1100, generator=torch.Generator().manual_seed(2))  # two whole tiles and a partial one
    total = torch.zeros(1100, 1100, dtype=torch.float64)
    _add_gram_upper(total, x[:120])
    _add_gram_upper(total, x[120:])
    _mirror_upper(total)
    a, b = x[:120].double(), x[120:].double()
    torch.testing.assert_close(total, a.t() @ a + b.t() @ b, rtol=1e-13, atol=1e-12)
    assert torch.equal(total, total.t())


def test_gptq_checkpoint_equals_the_per_matrix_engine_with_gptq_codes(tiny_dir, tmp_path):
    """quantize_checkpoint_gptq frees each Hessian after its last matrix and works in its memory: same output."""
    config = WeightQuantConfig(bits=4, group_size=32, symmetric=False)
    quantize_checkpoint_gptq(tiny_dir, tmp_path / "a", config, tokens=TOKENS)
    quantize_checkpoint_layerwise(tiny_dir, tmp_path / "b", config,
                                  lambda name, w, h: gptq_codes(w, h, config, GPTQConfig()),
                                  method="nnopt-gptq", settings={}, tokens=TOKENS)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
