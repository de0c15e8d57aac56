"""Streaming RTN quantization of Hugging Face checkpoints and the synthetic Llama writer (tiny models only)."""

import json

import pytest
import torch
from checkpoint_files import checkpoint_tensors as _tensors

from nnopt.errors import ConfigError, ModelFormatError, OutputError, UnsupportedModelError
from nnopt.layers import primitives as P
from nnopt.llm.streaming import dequantize_rtn, pack_int32, quantize_checkpoint_rtn, rtn_codes
from nnopt.llm.synthetic import INDEX_FILE, PRESETS, LlamaShape, plan_shards, write_synthetic_llama
from nnopt.quantization.weights import WeightQuantConfig

# hidden 96 and intermediate 160: groups of 64 leave partial last groups (96 = 64 + 32, 160 = 2·64 + 32).
SHAPE = LlamaShape(96, 160, 2, 4, 2, 128, "float32", max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny"
    write_synthetic_llama(path, SHAPE, seed=3, shard_bytes=60_000)  # several shards and an index
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return path



def test_synthetic_writer_is_sharded_deterministic_and_loads_in_transformers(tiny_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    index = json.loads((tiny_dir / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == len(plan_shards(SHAPE, 60_000)) > 1
    tensors = _tensors(tiny_dir)
    assert sum(t.numel() for t in tensors.values()) == SHAPE.parameters()
    # Values depend on the seed and the tensor, not on the shard layout.
    write_synthetic_llama(tmp_path / "one", SHAPE, seed=3)
    assert (tmp_path / "one" / "model.safetensors").is_file()
    again = _tensors(tmp_path / "one")
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    w = tensors["model.layers.1.mlp.up_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and torch.equal(tensors["model.norm.weight"], torch.ones(96))
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_dir)
    assert sum(p.numel() for p in model.parameters()) == SHAPE.parameters()
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight.detach(), w)


def test_presets_have_the_real_models_sizes():
    assert PRESETS["1.1b"].parameters() == 1_100_048_384  # TinyLlama-1.1B
    assert PRESETS["7b"].parameters() == 6_738_415_616 and PRESETS["7b"].dtype == "bfloat16"  # Llama-2-7B
    with pytest.raises(ConfigError, match="unknown synthetic model preset"):
        write_synthetic_llama("unused", "13b")


@pytest.mark.parametrize("config", [
    WeightQuantConfig(bits=4, group_size=64), WeightQuantConfig(bits=4, group_size=64, symmetric=False),
    WeightQuantConfig(bits=8, per_channel=True), WeightQuantConfig(bits=3, group_size=32),
    WeightQuantConfig(bits=8),
], ids=["int4-g64", "int4-g64-asym", "int8-channel", "int3-g32", "int8-tensor"])
def test_rtn_codes_bound_the_error_in_every_group_including_the_partial_one(config):
    w = torch.randn(40, 160, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, step, zero = rtn_codes(w, config)
    restored = dequantize_rtn(codes, step, zero, config.group_size)
    groups = 1 if config.group_size is None else P.group_count(160, config.group_size)
    assert step.shape == ((1, 1) if groups == 1 and not config.per_channel else (40, groups))
    width = 160 if config.group_size is None else config.group_size
    for g in range(groups):
        part = slice(g * width, (g + 1) * width)
        # Steps are 1/S of nnopt's own qparams for the group alone (the partial one: its 32 elements).
        axis = None if config.group_size is None and not config.per_channel else 0
        scale, z = P.compute_qparams(w[:, part], config.bits, config.symmetric, channel_axis=axis)
        torch.testing.assert_close(step[:, g:g + 1].expand(40, 1), (1 / scale.double()).float().expand(40, 1),
                                   rtol=0, atol=0)
        assert torch.equal(zero[:, g:g + 1].int().expand(40, 1), z.expand(40, 1))
        error = (restored[:, part] - w[:, part]).abs()
        assert bool((error <= step[:, g:g + 1] * (0.5 + 1e-5)).all()), g


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 70, 5])
def test_fast_packing_is_compressed_tensors_packing(bits, cols):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo, hi = P.qrange(bits, symmetric=False)
    codes = torch.randint(lo, hi + 1, (6, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_int32(codes, bits), helpers.pack_to_int32(codes, bits))
    assert torch.equal(helpers.unpack_from_int32(pack_int32(codes, bits), bits, codes.shape), codes)


def _reference_model(tiny_dir, config):
    """The source model with every quantized matrix replaced by its dequantized RTN codes."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith("model.layers.") and value.ndim == 2:
            state[key] = dequantize_rtn(*rtn_codes(value, config), config.group_size)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("config", [
    WeightQuantConfig(bits=4, group_size=64), WeightQuantConfig(bits=8, per_channel=True),
    WeightQuantConfig(bits=4, group_size=32, symmetric=False),
], ids=["int4-g64-partial", "int8-channel", "int4-g32-asym"])
def test_output_loads_in_transformers_as_the_dequantized_rtn_model(tiny_dir, tmp_path, config):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    seen = []
    result = quantize_checkpoint_rtn(tiny_dir, tmp_path / "q", config, progress=lambda *a: seen.append(a))
    assert result["quantized_tensors"] == 2 * 7 and result["peak_rss_bytes"] > 0 and result["seconds"] > 0
    assert seen[0][:2] == (1, result["units"]) and seen[-1][0] == result["units"] and seen[0][2] == "model.layers.0"
    assert (tmp_path / "q" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert not list(tmp_path.glob(".*partial"))
    source, quantized = _tensors(tiny_dir), _tensors(tmp_path / "q")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(source[name], quantized[name])  # copied unchanged
    kwargs = {}
    if not config.symmetric:  # transformers 5.25's default path mis-sizes packed zero points
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "q", **kwargs).eval()
    reference = _reference_model(tiny_dir, config)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_a_killed_run_resumes_from_its_last_shard_and_gives_the_same_output(tiny_dir, tmp_path):
    config = WeightQuantConfig(bits=4, group_size=64)

    def stop_after_two_units(done, total, unit):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # shard_bytes=1: every unit ends a shard
        quantize_checkpoint_rtn(tiny_dir, tmp_path / "q", config, stop_after_two_units, shard_bytes=1)
    partial = tmp_path / ".q.nnopt-partial"
    assert partial.is_dir() and not (tmp_path / "q").exists()
    progress = json.loads((partial / "nnopt-progress.json").read_text())
    assert progress["done_units"] == ["model.layers.0", "model.layers.1"]
    (partial / "model-00003.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    resumed = quantize_checkpoint_rtn(tiny_dir, tmp_path / "q", config, shard_bytes=1)
    assert resumed["resumed_units"] == 2 and not partial.exists()
    quantize_checkpoint_rtn(tiny_dir, tmp_path / "fresh", config, shard_bytes=1)
    a, b = _tensors(tmp_path / "q"), _tensors(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A different config does not pick up another run's partial output.
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint_rtn(tiny_dir, tmp_path / "r", config, stop_after_two_units, shard_bytes=1)
    other = quantize_checkpoint_rtn(tiny_dir, tmp_path / "r", WeightQuantConfig(bits=8), shard_bytes=1)
    assert other["resumed_units"] == 0


def test_refusals(tiny_dir, tmp_path):
    with pytest.raises(OutputError, match="exists"):
        quantize_checkpoint_rtn(tiny_dir, tiny_dir, WeightQuantConfig(bits=4))
    with pytest.raises(ConfigError, match="exceeds the input dimension 96"):
        quantize_checkpoint_rtn(tiny_dir, tmp_path / "q", WeightQuantConfig(bits=4, group_size=128))
    with pytest.raises(ModelFormatError, match="holds no model.safetensors"):
        quantize_checkpoint_rtn(tmp_path, tmp_path / "q", WeightQuantConfig(bits=4))
    done = tmp_path / "done"
    quantize_checkpoint_rtn(tiny_dir, done, WeightQuantConfig(bits=8), shard_bytes=1 << 30)
    with pytest.raises(ModelFormatError, match="already quantized"):
        quantize_checkpoint_rtn(done, tmp_path / "again", WeightQuantConfig(bits=8))


def test_layers_patterns_narrow_the_selection(tiny_dir, tmp_path):
    config = WeightQuantConfig(bits=8, per_channel=True, layers=("re:mlp\\.down_proj$",))
    result = quantize_checkpoint_rtn(tiny_dir, tmp_path / "q", config)
    assert result["quantized_tensors"] == 2
    names = _tensors(tmp_path / "q")
    assert "model.layers.0.mlp.down_proj.weight_packed" in names and "model.layers.0.mlp.up_proj.weight" in names
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["targets"] for g in groups.values()] == [[r"re:^model\.layers\.\d+\.mlp\.down_proj$"]]


def test_a_checkpoint_with_nothing_to_quantize_is_refused(tmp_path):
    """GPT-2's blocks are transformer.h.N: the writer names what it quantizes instead of copying everything."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(src, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match="no weight to quantize"):
        quantize_checkpoint_rtn(src, tmp_path / "out", WeightQuantConfig(bits=4, group_size=16))
    assert not (tmp_path / "out").exists()


def test_shards_are_save_files_bytes_and_source_tensors_are_read_and_copied_without_a_memory_map(tmp_path):
    from safetensors.torch import save_file

    from nnopt.llm import streaming

    g = torch.Generator().manual_seed(0)
    tensors = {
        "emb": torch.randn(9, 4, generator=g), "half": torch.randn(3, 2, generator=g).half(),
        "bf": torch.randn(5, generator=g).bfloat16(), "codes": torch.arange(-4, 4, dtype=torch.int8),
        "packed": torch.arange(6, dtype=torch.int32).reshape(2, 3), "shape": torch.tensor([2, 3]),
        "f64": torch.randn(2, dtype=torch.float64, generator=g), "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5),
    }
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    streaming.save_safetensors(tmp_path / "b.safetensors", tensors, metadata={"format": "pt"})
    original = (tmp_path / "a.safetensors").read_bytes()
    assert (tmp_path / "b.safetensors").read_bytes() == original  # save_file's layout, byte for byte
    entries = {t.name: t for t in streaming._header_tensors(tmp_path / "a.safetensors", "a.safetensors")}
    for name, tensor in tensors.items():
        read = streaming._read_tensor(tmp_path, entries[name])
        assert read.dtype == tensor.dtype and read.shape == tensor.shape and torch.equal(read, tensor), name
    copied = {name: streaming._Copied(tmp_path, t) for name, t in entries.items()}
    streaming.save_safetensors(tmp_path / "c.safetensors", copied, metadata={"format": "pt"})
    assert (tmp_path / "c.safetensors").read_bytes() == original
    rows = torch.tensor([0, 2, 3, 4, 8])  # runs of consecutive rows read at once
    assert torch.equal(streaming.read_rows(tmp_path, entries["emb"], rows), tensors["emb"][rows])
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(original[:-3])
    with pytest.raises(ModelFormatError, match="run past the"):
        streaming._read_source(tmp_path / "cut")
