"""`nnopt llm eval` end to end on a tiny random Llama directory: the perplexity it prints and writes as JSON is
the one nnopt.llm.quality computes on the evaluation text; KL against itself is 0; bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from nnopt.cli import main

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tiny_bpe_tokenizer):
    """A random 2-layer Llama with a byte-level BPE tokenizer trained here on the calibration text."""
    tokenizer = tiny_bpe_tokenizer
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      max_position_embeddings=128)
    path = tmp_path_factory.mktemp("llm") / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    return path


def test_eval_prints_and_writes_the_measured_perplexity(tiny_lm, tmp_path, capsys):
    from nnopt.llm import corpus, quality
    from nnopt.llm.source import load_causal_lm

    out = tmp_path / "ppl.json"
    assert main(["llm", "eval", str(tiny_lm), "--window", "64", "--max-windows", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["model"].startswith(f"safetensors: {tiny_lm} (") and doc["model_type"] == "llama"
    assert (doc["windows"], doc["window"], doc["tokens"]) == (3, 64, 3 * 63)
    assert doc["kl_mean"] is None and doc["reference"] is None and doc["peak_rss_bytes"] > 0
    assert doc["method"].startswith("measured: ") and doc["text"].startswith("evaluation text")
    loaded = load_causal_lm(tiny_lm)
    windows = corpus.token_windows(loaded.tokenizer, corpus.evaluation_text(), 64, max_windows=3)
    assert doc["text_tokens"] > 50_000
    assert doc["perplexity"] == pytest.approx(quality.perplexity(loaded.model, windows).perplexity, rel=1e-6)
    assert f"perplexity {doc['perplexity']:.4f} over 189 tokens in 3 windows of 64" in printed


def test_eval_against_itself_has_zero_kl(tiny_lm, tmp_path):
    out = tmp_path / "kl.json"
    assert main(["llm", "eval", str(tiny_lm), "--reference", str(tiny_lm), "--window", "32", "--stride", "16",
                 "--max-windows", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["kl_mean"] == 0.0 and doc["tokens"] == 31 + 16 and doc["reference"] == doc["model"]


def test_own_text_file(tiny_lm, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "mine.json"
    assert main(["llm", "eval", str(tiny_lm), "--text", str(text), "--window", "32", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["text"] == str(text) and doc["windows"] == doc["text_tokens"] // 32


@pytest.mark.parametrize("args, message", [
    (["--window", "1000"], "--window 1000 is longer than the model's 128 positions"),
    (["--window", "0"], "--window must be an integer >= 1"),
    (["--max-windows", "x"], "--max-windows must be an integer >= 1"),
])
def test_bad_options_are_one_line_errors(tiny_lm, capsys, args, message):
    assert main(["llm", "eval", str(tiny_lm), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nnopt: error:") and message in err, err


def test_models_that_cannot_be_evaluated_are_one_line_errors(tiny_lm, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        (bare / name).write_bytes((tiny_lm / name).read_bytes())
    for shard in tiny_lm.glob("model-*.safetensors"):
        (bare / shard.name).write_bytes(shard.read_bytes())
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_bytes((tiny_lm / "config.json").read_bytes())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"never opened")
    for model, message in [(bare, "no tokenizer files"), (tmp_path / "absent", "no such model directory"),
                           (tmp_path / "pickled", "safetensors only")]:
        assert main(["llm", "eval", str(model)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_quantize_streams_a_checkpoint_that_eval_reads_back_close_to_the_original(tiny_lm, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    out, report = tmp_path / "int8", tmp_path / "quantize.json"
    assert main(["llm", "quantize", str(tiny_lm), "-o", str(out), "--bits", "8", "--group-size", "channel",
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    measured = json.loads(report.read_text())
    assert measured["quantized_tensors"] == 2 * 7 and measured["peak_rss_bytes"] > 0  # q,k,v,o,gate,up,down × 2
    assert "peak RSS" in printed and json.loads((out / "config.json").read_text())["quantization_config"]
    scores = tmp_path / "eval.json"
    assert main(["llm", "eval", str(out), "--reference", str(tiny_lm), "--window", "64", "--max-windows", "3",
                 "--json", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert 0 < result["kl_mean"] < 1e-3  # int8 per channel: close to, but not the same as, the float model
    # the output exists now: a second run refuses to overwrite it, in one line
    assert main(["llm", "quantize", str(tiny_lm), "-o", str(out)]) != 0
    assert "exists" in capsys.readouterr().err


def test_quantize_with_gptq_calibrates_layer_by_layer_and_says_so(tiny_lm, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    out, report = tmp_path / "gptq", tmp_path / "gptq.json"
    assert main(["llm", "quantize", str(tiny_lm), "-o", str(out), "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--calibration-windows", "2", "--calibration-window", "64",
                 "--json", str(report)]) == 0
    assert "(gptq, int4 groups of 32, symmetric)" in capsys.readouterr().out
    measured = json.loads(report.read_text())
    assert measured["method"] == "nnopt-gptq" and measured["calibration_tokens"] == 2 * 64
    assert json.loads((out / "config.json").read_text())["quantization_config"]["version"] == "nnopt-gptq"
    assert main(["llm", "eval", str(out), "--reference", str(tiny_lm), "--window", "64", "--max-windows", "2"]) == 0
    assert "kl_mean" in capsys.readouterr().out


@pytest.mark.parametrize("method, extra, scheme", [
    ("awq", ["--bits", "4", "--group-size", "32"], "(awq, int4 groups of 32, symmetric)"),
    ("smoothquant", ["--alpha", "0.6"], "(smoothquant, int8 per channel, symmetric + int8 activations per token"),
])
def test_quantize_with_awq_and_smoothquant(tiny_lm, tmp_path, capsys, method, extra, scheme):
    pytest.importorskip("compressed_tensors")
    out, report = tmp_path / method, tmp_path / f"{method}.json"
    assert main(["llm", "quantize", str(tiny_lm), "-o", str(out), "--method", method, *extra,
                 "--calibration-windows", "2", "--calibration-window", "64", "--json", str(report)]) == 0
    assert scheme in capsys.readouterr().out
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["version"] == f"nnopt-{method}"
    activations = [g["input_activations"] for g in quantization["config_groups"].values()]
    assert all((a is not None) == (method == "smoothquant") for a in activations)
    assert json.loads(report.read_text())["calibration_tokens"] == 2 * 64


def test_commands_that_do_not_split_across_processes_are_refused_under_torchrun(tiny_lm, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["quantize", "--method", "rtn"], ["prune", "--method", "magnitude"]):
        assert main(["llm", command[0], str(tiny_lm), "-o", str(tmp_path / "never"), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "under torchrun (WORLD_SIZE=2)" in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "rtn", "--damp", "0.1"], "--damp applies to --method gptq, not rtn"),
    (["--method", "gptq", "--alpha", "0.5"], "--alpha applies to --method smoothquant, not gptq"),
    (["--method", "rtn", "--calibration-windows", "4"], "--calibration-windows applies to --method"),
    (["--method", "smoothquant", "--bits", "4"], "--method smoothquant is W8A8"),
    (["--method", "awq", "--act-order"], "--act-order applies to --method gptq, not awq"),
])
def test_options_of_another_method_are_refused(tiny_lm, tmp_path, capsys, args, message):
    assert main(["llm", "quantize", str(tiny_lm), "-o", str(tmp_path / "never"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "never").exists()


def test_prune_writes_a_float_checkpoint_with_the_pattern_it_reports(tiny_lm, tmp_path, capsys):
    from safetensors import safe_open

    out, report = tmp_path / "wanda-2-4", tmp_path / "prune.json"
    assert main(["llm", "prune", str(tiny_lm), "-o", str(out), "--method", "wanda", "--pattern", "2:4",
                 "--calibration-windows", "2", "--calibration-window", "64", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    measured = json.loads(report.read_text())
    assert measured["sparsity"] == pytest.approx(0.5) and measured["pattern_holds"] is True
    assert f"sparsity   {measured['sparsity']:.4f}" in printed
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["nnopt_sparsity"]["pattern"] == "2:4"
    checked = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for name in (n for n in fh.keys() if n.endswith("mlp.down_proj.weight")):
                weight = fh.get_tensor(name)
                assert bool(((weight.reshape(-1, 4) == 0).sum(dim=1) >= 2).all()), name
                checked += 1
    assert checked == 2
    assert main(["llm", "eval", str(out), "--reference", str(tiny_lm), "--window", "64", "--max-windows", "2"]) == 0
    for bad, message in [(["--pattern", "4:2"], "N:M"), (["--pattern", "x"], "--pattern: expected N:M"),
                         (["--sparsity", "1.5"], "sparsity"),
                         (["--method", "magnitude", "--calibration-windows", "4"], "reads no calibration data")]:
        assert main(["llm", "prune", str(tiny_lm), "-o", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_gguf_writes_a_file_transformers_reads_back(tiny_lm, tmp_path, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    out = tmp_path / "tiny.Q8_0.gguf"
    assert main(["llm", "gguf", str(tiny_lm), "-o", str(out), "--quant", "Q8_0"]) == 0
    assert "peak RSS" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["llm", "eval", str(out), "--reference", str(tiny_lm), "--window", "64", "--max-windows", "2"]) == 0
    assert main(["llm", "gguf", str(tiny_lm), "-o", str(out)]) != 0  # an existing output is refused
    assert "exists" in capsys.readouterr().err


def test_bench_times_each_precision_and_reports_the_bandwidth_fraction(tiny_lm, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["llm", "bench", str(tiny_lm), "--variants", "fp32,int8", "--new-tokens", "4", "--prefill", "32",
                 "--rounds", "1", "--json", str(report)]) == 0
    measured = json.loads(report.read_text())
    rows = {r["variant"]: r for r in measured["rows"]}
    assert set(rows) == {"fp32", "int8"} and measured["copy_bandwidth_bytes_per_s"] > 0
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows.values())
    assert rows["int8"]["weight_bytes_per_token"] < rows["fp32"]["weight_bytes_per_token"]
    assert rows["int8"]["kernels"] and "of copy bandwidth" in capsys.readouterr().out
    assert main(["llm", "bench", str(tiny_lm), "--variants", "fp16"]) != 0
    assert "--variants" in capsys.readouterr().err
