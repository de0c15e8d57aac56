"""The layer-by-layer engine's contract with a whole-layer method: changed tensors are written, float output,
statistics handed over before normalisation (tiny random Llama models only)."""

import json

import pytest
import torch
from checkpoint_files import checkpoint_tensors as _tensors

from nnopt.errors import ConfigError
from nnopt.llm.layerwise import LayerContext, quantize_checkpoint_layerwise
from nnopt.llm.streaming import rtn_codes
from nnopt.llm.synthetic import LlamaShape, write_synthetic_llama
from nnopt.quantization.weights import WeightQuantConfig

SHAPE = LlamaShape(64, 96, 2, 4, 2, 128, "float32", max_position_embeddings=64)
TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny"
    write_synthetic_llama(path, SHAPE, seed=5)
    return path



def _rescale(context: LayerContext) -> dict:
    """A float-preserving change: input_layernorm × 2, q/k/v × 0.5 (what a smoothing method does)."""
    attention = context.layer.self_attn
    with torch.no_grad():
        context.layer.input_layernorm.weight.mul_(2.0)
        for module in (attention.q_proj, attention.k_proj, attention.v_proj):
            module.weight.mul_(0.5)
    return {}


def _logits(directory):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_float_output_writes_every_tensor_the_method_changed(tiny_dir, tmp_path):
    out = tmp_path / "scaled"
    result = quantize_checkpoint_layerwise(tiny_dir, out, WeightQuantConfig(), layer_method=_rescale,
                                           method="test-rescale", settings={}, tokens=TOKENS, quantize=False,
                                           config_entries={"nnopt_test": {"scaled": True}})
    assert result["format"] == "safetensors" and result["calibrated_layers"] == SHAPE.num_hidden_layers
    source, written = _tensors(tiny_dir), _tensors(out)
    assert set(written) == set(source)
    for i in range(SHAPE.num_hidden_layers):
        norm = f"model.layers.{i}.input_layernorm.weight"
        assert torch.equal(written[norm], source[norm] * 2)
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(written[q], source[q] * 0.5)
        o = f"model.layers.{i}.self_attn.o_proj.weight"
        assert torch.equal(written[o], source[o])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["nnopt_test"] == {"scaled": True}
    torch.testing.assert_close(_logits(out), _logits(tiny_dir), rtol=1e-4, atol=1e-4)


def test_weights_a_method_leaves_out_are_rounded_as_it_left_them(tiny_dir, tmp_path):
    config = WeightQuantConfig(bits=4, group_size=32)
    out = tmp_path / "rtn"
    quantize_checkpoint_layerwise(tiny_dir, out, config, layer_method=_rescale, method="test-rescale",
                                  settings={}, tokens=TOKENS)
    source, written = _tensors(tiny_dir), _tensors(out)
    q = "model.layers.1.self_attn.q_proj"
    expected_codes, expected_step, _ = rtn_codes(source[f"{q}.weight"] * 0.5, config)
    torch.testing.assert_close(written[f"{q}.weight_scale"], expected_step)
    assert torch.equal(written["model.layers.1.input_layernorm.weight"],
                       source["model.layers.1.input_layernorm.weight"] * 2)
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["quantization_config"]["version"] == "test-rescale"
    assert expected_codes.shape == (SHAPE.hidden_size, SHAPE.hidden_size)


def test_statistics_reach_the_reducer_as_sums_and_the_method_normalised(tiny_dir, tmp_path):
    seen: list[list[str]] = []
    sums: dict[str, torch.Tensor] = {}

    def reducer(stats):
        seen.append(list(stats))
        for name, entry in stats.items():
            sums[name] = entry.hessian.clone()
            assert entry.tokens == TOKENS.numel()

    def check(context: LayerContext) -> dict:
        for name, entry in context.stats.items():
            if name in sums:  # H = 2 XᵀX / n of the sums the reducer saw
                torch.testing.assert_close(entry.hessian, sums[name] * 2 / entry.tokens)
            assert entry.absmax.shape == (context.linears[name].in_features,)
            assert bool((entry.absmax >= 0).all()) and float(entry.absmax.max()) > 0
        return {}

    quantize_checkpoint_layerwise(tiny_dir, tmp_path / "o", WeightQuantConfig(bits=8, per_channel=True),
                                  layer_method=check, method="test-check", settings={}, tokens=TOKENS,
                                  reduce_stats=reducer)
    assert len(seen) == SHAPE.num_hidden_layers
    # one entry per distinct input (q/k/v share one, gate/up another), in the same sorted order every time
    assert all(names == sorted(names) and len(names) == 4 for names in seen)


def test_bad_method_results_and_arguments_are_refused(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        quantize_checkpoint_layerwise(tiny_dir, tmp_path / "a", WeightQuantConfig(), method="x", settings={},
                                      tokens=TOKENS)

    def stray(context: LayerContext) -> dict:
        weight = context.layer.input_layernorm.weight
        return {"model.layers.0.input_layernorm.weight": (weight, weight, weight)}

    with pytest.raises(ConfigError, match="not a chosen weight"):
        quantize_checkpoint_layerwise(tiny_dir, tmp_path / "b", WeightQuantConfig(), layer_method=stray,
                                      method="x", settings={}, tokens=TOKENS)


def test_the_engines_maskless_layer_passes_are_causal_and_equal_to_an_explicit_causal_mask(tiny_dir, tmp_path):
    seen = []

    def check(context: LayerContext) -> dict:
        inputs = context.inputs[:2].clone()
        got = context.forward(inputs)
        window = inputs.shape[1]
        mask = torch.full((window, window), float("-inf")).triu(1)[None, None]
        positions = torch.arange(window).unsqueeze(0)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        position = LlamaRotaryEmbedding(config=context.layer.self_attn.config)(inputs[:1], positions)
        with torch.no_grad():
            out = context.layer(inputs, attention_mask=mask, position_ids=positions, position_embeddings=position)
        expected = out[0] if isinstance(out, tuple) else out
        changed = inputs.clone()
        changed[:, -1] += 1.0  # the last token changes: no earlier position may see it
        later = context.forward(changed)
        seen.append((torch.allclose(got, expected, atol=1e-6, rtol=0),
                     torch.equal(got[:, :-1], later[:, :-1]), torch.equal(got[:, -1], later[:, -1])))
        return {}

    quantize_checkpoint_layerwise(tiny_dir, tmp_path / "out", WeightQuantConfig(), layer_method=check,
                                  method="test-causal", settings={}, tokens=TOKENS, quantize=False)
    assert seen and all(same and causal and not last for same, causal, last in seen)
