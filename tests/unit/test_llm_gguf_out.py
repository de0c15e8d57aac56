"""GGUF output (Q8_0/Q4_0) of tiny random Llamas: the files open in gguf's reader and in transformers, whose
logits equal those of a model holding the dequantized weights (so names, types and the q/k row order are
right), and in llama.cpp's own tools when ``NNOPT_LLAMA_CPP`` names a directory of built binaries."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnopt.errors import ConfigError, OutputError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from nnopt.llm.gguf_out import permute_rotary_rows, write_gguf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

SENTENCE = "It is a truth universally acknowledged, that a single man in possession of a good fortune."


def _tiny_llama(path, tokenizer, *, tied: bool, init_std: float = 0.02):
    """A random 2-layer Llama (4 heads, 2 KV heads) with a byte-level BPE tokenizer trained here, sharded."""
    torch.manual_seed(1 + tied)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      max_position_embeddings=128, rope_theta=50_000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=tied, initializer_range=init_std)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1 so that a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tiny_bpe_tokenizer):
    return _tiny_llama(tmp_path_factory.mktemp("llm") / "untied", tiny_bpe_tokenizer, tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tiny_bpe_tokenizer):
    return _tiny_llama(tmp_path_factory.mktemp("llm") / "tied", tiny_bpe_tokenizer, tied=True)


EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def _roundtrip(values: np.ndarray, quant: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[quant]
    return gguf.quants.dequantize(gguf.quants.quantize(values.astype(np.float32), qtype), qtype)


def _load_gguf(file):
    model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                              dtype=torch.float32)
    return model.eval()


def _dequantized(src, quant: str, embedding_quant: str = "Q8_0"):
    """The source model with every matrix replaced by its dequantized blocks (the embeddings and lm_head in
    ``embedding_quant``'s): what a GGUF file of it holds, in Hugging Face's layout."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is the embeddings' parameter: seen once
            if p.dim() == 2:
                p.copy_(torch.from_numpy(_roundtrip(p.numpy(), embedding_quant if name in EMBEDDINGS else quant)))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("quant", "embedding_quant"), [("Q8_0", "Q8_0"), ("Q4_0", "Q8_0"), ("Q4_0", "Q4_0")])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_transformers_loads_exactly_the_dequantized_weights(quant, embedding_quant, which, request, tmp_path):
    src = request.getfixturevalue(which)
    out = tmp_path / f"tiny-{quant}.gguf"
    seen = []
    result = write_gguf(src, out, quant, progress=lambda done, total, name: seen.append((done, total, name)),
                        embedding_quant=embedding_quant)
    source = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    n_matrices = 7 * 2 + 1 + (which == "untied")  # q k v o gate up down per layer, embeddings, lm_head
    n_embeddings = 1 + (which == "untied")  # token_embd, and output when not tied
    expected_counts = {quant: n_matrices - n_embeddings, "F32": 2 * 2 + 1}
    expected_counts[embedding_quant] = expected_counts.get(embedding_quant, 0) + n_embeddings
    assert result["tensors"] == expected_counts
    assert result["output_bytes"] == out.stat().st_size and result["peak_rss_bytes"] > 0
    assert [s[0] for s in seen] == list(range(1, n_matrices + 6)) and seen[-1][1] == n_matrices + 5
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary sibling was renamed away

    expected = _dequantized(src, quant, embedding_quant)
    loaded = _load_gguf(out)
    assert loaded.config.tie_word_embeddings == (which == "tied")
    assert loaded.config.rope_parameters["rope_theta"] == 50_000.0 and loaded.config.num_key_value_heads == 2
    ids = torch.tensor([[5, 77, 130, 9, 201, 44, 12, 260, 3, 99, 150, 31]])
    got, want, original = _logits(loaded, ids), _logits(expected, ids), _logits(source, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # same weights, same places
    error = float((got - original).abs().max() / original.abs().max())
    assert error < (0.03 if quant == "Q8_0" else 0.3), error  # measured: ≈ 0.01 and 0.15–0.2
    assert error > 0  # it really is quantized
    if embedding_quant != quant:  # the embeddings really are in their own type, not in quant's
        with torch.no_grad():
            for name, p in expected.named_parameters():
                if name in EMBEDDINGS:
                    p.copy_(torch.from_numpy(_roundtrip(source.get_parameter(name).numpy(), quant)))
        assert float((_logits(expected, ids) - got).abs().max()) > 1e-4


def test_reader_sees_llama_cpp_names_types_shapes_and_metadata(untied, tmp_path):
    out = tmp_path / "tiny.gguf"
    write_gguf(untied, out, "Q4_0")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in (
            "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    q4, q8, f32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert {n: t.tensor_type for n, t in tensors.items() if t.tensor_type != f32} == {
        n: q8 if n in ("token_embd.weight", "output.weight") else q4 for n in tensors if "norm" not in n}
    assert tensors["blk.1.attn_k.weight"].tensor_type == q4 and list(tensors["blk.1.attn_k.weight"].shape) == [64, 32]
    assert tensors["blk.0.ffn_down.weight"].tensor_type == q4 and list(tensors["blk.0.ffn_down.weight"].shape) == [
        128, 64]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == f32
    assert list(tensors["token_embd.weight"].shape) == [64, 300]

    def field(name):
        return reader.fields[name].contents()

    assert field("general.architecture") == "llama" and field("general.file_type") == 2  # MOSTLY_Q4_0
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == (
        2, 64, 128)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert (field("llama.context_length"), field("llama.vocab_size"), field("llama.rope.dimension_count")) == (
        128, 300, 16)
    assert field("llama.rope.freq_base") == 50_000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 300 and tokens[field("tokenizer.ggml.eos_token_id")] == "<|endoftext|>"
    assert field("tokenizer.ggml.token_type")[tokens.index("<|endoftext|>")] == 3  # control

    # The stored q rows are the source's, reordered per head (llama.cpp's rotary pairing).
    from safetensors import safe_open

    index = json.loads((untied / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.q_proj.weight"
    with safe_open(str(untied / index[name]), framework="numpy") as fh:
        w = fh.get_tensor(name)
    stored = gguf.quants.dequantize(tensors["blk.1.attn_q.weight"].data, q4)
    np.testing.assert_array_equal(stored, permute_rotary_rows(_roundtrip(w, "Q4_0"), 4))
    assert not np.array_equal(permute_rotary_rows(w, 4), w)


def test_permutation_interleaves_the_halves_of_each_head():
    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of 4 rows: (0 1 | 2 3), (4 5 | 6 7)
    assert permute_rotary_rows(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ConfigError, match="heads of even size"):
        permute_rotary_rows(np.zeros((6, 4), np.float32), 2)


def test_tokenizer_round_trip(untied, tmp_path):
    out = tmp_path / "tiny.gguf"
    write_gguf(untied, out, "Q8_0")
    original = transformers.AutoTokenizer.from_pretrained(untied)
    from_gguf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in (SENTENCE, "Anne Elliot, 1814: 'no!'\n\nCaptain Wentworth<|endoftext|>"):
        ids = original(text)["input_ids"]
        assert from_gguf(text)["input_ids"] == ids and len(ids) > 10
        assert from_gguf.decode(ids) == text
    assert from_gguf.eos_token == "<|endoftext|>"


def test_chat_template_comes_from_its_jinja_file(untied, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(untied, src)
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    (src / "chat_template.jinja").write_text(template)  # where transformers 5 saves it
    write_gguf(src, tmp_path / "t.gguf", "Q8_0")
    assert gguf.GGUFReader(tmp_path / "t.gguf").fields["tokenizer.chat_template"].contents() == template


def test_gguf_source_is_requantized_with_its_metadata(tied, tmp_path):
    first = tmp_path / "q8.gguf"
    write_gguf(tied, first, "Q8_0")
    second = tmp_path / "q4.gguf"
    result = write_gguf(first, second, "Q4_0")
    assert result["source"] == f"gguf: {first}" and result["tokenizer"] == "gpt2"
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name and list(ta.shape) == list(tb.shape)
        if ta.tensor_type == q8:
            kept = ta.name == "token_embd.weight"  # tied: the embeddings are the output layer, kept at Q8_0
            assert tb.tensor_type == (q8 if kept else q4)
            np.testing.assert_array_equal(gguf.quants.dequantize(tb.data, tb.tensor_type),
                                          _roundtrip(gguf.quants.dequantize(ta.data, q8), tb.tensor_type.name))
        else:
            np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data))
    same = [k for k in a.fields if not k.startswith("GGUF.") and k != "general.file_type"]
    assert all(a.fields[k].contents() == b.fields[k].contents() for k in same)
    assert b.fields["general.file_type"].contents() == 2
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(tied)(SENTENCE)["input_ids"]])
    assert torch.isfinite(_logits(_load_gguf(second), ids)).all()


def test_bad_input_is_refused_clearly(untied, tmp_path):
    with pytest.raises(ConfigError, match="no such model directory"):
        write_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="quant must be one of Q8_0, Q4_0"):
        write_gguf(untied, tmp_path / "x.gguf", "Q5_K")
    with pytest.raises(ConfigError, match="embedding quant must be one of Q8_0, Q4_0, got 'F16'"):
        write_gguf(untied, tmp_path / "x.gguf", "Q4_0", embedding_quant="F16")
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError, match="it exists"):
        write_gguf(untied, existing)
    assert existing.read_bytes() == b"keep"

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        write_gguf(gpt2, tmp_path / "x.gguf")

    # A tokenizer llama.cpp's gpt2 model cannot express: refused before anything is written.
    import shutil

    other = tmp_path / "other"
    shutil.copytree(untied, other)
    doc = json.loads((other / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="pre-tokenizer"):
        write_gguf(other, tmp_path / "x.gguf")
    (other / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        write_gguf(other, tmp_path / "x.gguf")
    not_gguf = tmp_path / "model.txt"
    not_gguf.write_text("hello")
    with pytest.raises(ConfigError, match="not a model directory or a .gguf file"):
        write_gguf(not_gguf, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


# ------------------------------------------------------------------------------- llama.cpp reads the files

def _llamacpp_helpers():
    """benchmarks/_llamacpp.py (the benchmarks' runner of llama.cpp's tools), loaded from its path."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_llamacpp.py"
    spec = importlib.util.spec_from_file_location("nnopt_bench_llamacpp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _llamacpp_perplexity_by_transformers(model, ids: list[int], context: int, chunks: int) -> float:
    """llama-perplexity's figure computed here: chunks of ``context`` tokens, each scored on its second half
    (positions context/2 .. context-2 predict the next token); no BOS (the tiny tokenizer adds none)."""
    nll, count = 0.0, 0
    for c in range(chunks):
        chunk = torch.tensor([ids[c * context:(c + 1) * context]])
        logp = torch.log_softmax(_logits(model, chunk)[0].double(), dim=-1)
        first = context // 2
        targets = chunk[0, first + 1:]
        nll -= float(logp[first:context - 1].gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / count)


def test_llamacpp_helpers_say_why_when_there_are_no_binaries(tmp_path, monkeypatch):
    helpers = _llamacpp_helpers()
    monkeypatch.delenv(helpers.ENV_VAR, raising=False)
    assert helpers.perplexity(tmp_path / "m.gguf", "text")[0] is None
    assert "NNOPT_LLAMA_CPP is not set" in helpers.bench(tmp_path / "m.gguf")[1]
    assert "no executable llama-bench" in helpers.bench(tmp_path / "m.gguf", tmp_path)[1]


def _trained_tiny_llama(path, tokenizer, *, tied: bool, steps: int = 150):
    """The tiny Llama trained ``steps`` AdamW steps on the calibration text (about 10 s on one thread): a model
    that predicts (perplexity about 30 of 300 tokens), so that a tensor out of place shows. Measured with
    llama.cpp b4747: llama.cpp and transformers agree within 0.15% on its files; written without the q/k
    row reorder, llama.cpp's perplexity rises by 5% after 100 steps, by 80% after 300."""
    from nnopt.llm.corpus import calibration_text

    src = _tiny_llama(path / "init", tokenizer, tied=tied)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    data = torch.tensor(tokenizer(calibration_text()[:60_000])["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=generator)
        batch = torch.stack([data[i:i + 64] for i in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path / "trained", max_shard_size="100KB")
    tokenizer.save_pretrained(path / "trained")
    return path / "trained"


@pytest.mark.parametrize("tied", [False, True])
def test_llama_cpp_computes_the_perplexity_transformers_computes(tied, tiny_bpe_tokenizer, tmp_path):
    """llama.cpp's own llama-perplexity reads nnopt's Q8_0 and Q4_0 files (tokenizer, names, q/k order, types,
    tied output) and finds the perplexity that transformers finds for the model holding the same dequantized
    weights (the source's layout, not read from the file), on the same tokens. Runs where
    NNOPT_LLAMA_CPP names a directory of built llama.cpp binaries (llama-perplexity); skipped elsewhere."""
    helpers = _llamacpp_helpers()
    exe, why = helpers.tool(helpers.PERPLEXITY)
    if exe is None:
        pytest.skip(why)
    from nnopt.llm.corpus import evaluation_text

    src = _trained_tiny_llama(tmp_path, tiny_bpe_tokenizer, tied=tied)
    context, chunks = 64, 4
    text = evaluation_text()[:4000]
    ids = tiny_bpe_tokenizer(text)["input_ids"]
    assert len(ids) >= context * chunks
    for quant in ("Q8_0", "Q4_0"):
        out = tmp_path / f"tiny-{quant}.gguf"
        write_gguf(src, out, quant)
        got, why = helpers.perplexity(out, text, context=context, chunks=chunks, threads=1, batch=context,
                                      timeout_s=120)
        assert got is not None, why
        assert (got["chunks"], got["context"], got["tokens_scored"]) == (chunks, context, chunks * 31)
        assert len(got["running"]) == chunks and math.isfinite(got["perplexity"])
        want = _llamacpp_perplexity_by_transformers(_dequantized(src, quant), ids, context, chunks)
        assert want < 100  # it predicts (uniform guessing: 300)
        # measured ≤ 0.15% apart: llama.cpp rounds activations to 8 bits for its quantized dot products
        assert got["perplexity"] == pytest.approx(want, rel=0.01), (quant, got["perplexity"], want)
