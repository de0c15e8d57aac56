"""nnopt.llm.quality and nnopt.llm.corpus: perplexity and next-token KL against hand computations on a tiny
random Llama; the calibration and evaluation texts never overlap."""

from __future__ import annotations

import math

import pytest
import torch

from nnopt.errors import ConfigError
from nnopt.llm import corpus, quality

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(3))


def _hand_nll(model, window_ids: torch.Tensor, first_scored: int) -> tuple[float, int]:
    """Sum of -log p(token t | tokens < t) for t = first_scored .. end, one plain loop over positions."""
    with torch.no_grad():
        logits = model(input_ids=window_ids[None]).logits[0].double()
    total = 0.0
    for t in range(first_scored, window_ids.numel()):
        total -= float(torch.log_softmax(logits[t - 1], dim=-1)[window_ids[t]])
    return total, window_ids.numel() - first_scored


def test_perplexity_equals_a_hand_computation_over_non_overlapping_windows(model, ids):
    result = quality.perplexity(model, ids, window=32)
    total, count = 0.0, 0
    for start in (0, 32, 64):  # three whole windows; the last 4 tokens are dropped
        nll, n = _hand_nll(model, ids[start:start + 32], 1)
        total, count = total + nll, count + n
    assert (result.windows, result.tokens, result.window, result.stride) == (3, 3 * 31, 32, 32)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.kl_mean is None and result.method.startswith("measured: ")
    assert set(result.to_dict()) >= {"perplexity", "kl_mean", "tokens", "windows", "seconds", "method"}
    # an untrained model is close to uniform over the vocabulary, and never better than it by much
    assert 0.5 * VOCAB < result.perplexity < 2 * VOCAB


def test_strided_windows_score_each_token_once_with_more_context(model, ids):
    result = quality.perplexity(model, ids, window=32, stride=16, max_windows=4)
    total, count = _hand_nll(model, ids[0:32], 1)
    for start in (16, 32, 48):  # later windows score only their last 16 tokens
        nll, n = _hand_nll(model, ids[start:start + 32], 16)
        total, count = total + nll, count + n
    assert (result.windows, result.tokens) == (4, 31 + 3 * 16)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batching_and_given_windows_agree(model, ids):
    one = quality.perplexity(model, ids, window=32)
    batched = quality.perplexity(model, ids, window=32, batch=3)
    given = quality.perplexity(model, ids[:96].reshape(3, 32))
    assert batched.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert given.perplexity == pytest.approx(one.perplexity, rel=1e-9) and given.tokens == one.tokens


def test_kl_is_zero_against_itself_and_grows_with_a_perturbation(model, ids):
    windows = ids[:96].reshape(3, 32)
    assert quality.next_token_kl(model, model, windows) == 0.0
    perturbed = transformers.LlamaForCausalLM(model.config).eval()
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        weight = perturbed.model.layers[0].mlp.down_proj.weight
        weight.add_(0.5 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    kl = quality.next_token_kl(model, perturbed, windows)
    with torch.no_grad():  # reference: torch's kl_div on the positions that predict tokens 2..32 of each window
        log_q = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
        log_p = torch.log_softmax(perturbed(input_ids=windows).logits[:, :-1].double(), -1)
    expected = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="sum") / (3 * 31)
    assert kl > 0 and kl == pytest.approx(float(expected), rel=1e-9)
    both = quality.evaluate(perturbed, windows, reference=model)
    assert both.kl_mean == pytest.approx(kl, rel=1e-12) and "KL(P_ref || P_model)" in both.method


def test_bad_windows_are_config_errors(model, ids):
    with pytest.raises(ConfigError, match="fewer than one window"):
        quality.perplexity(model, ids[:10], window=32)
    with pytest.raises(ConfigError, match="stride in \\[1, window\\]"):
        quality.perplexity(model, ids, window=32, stride=40)
    with pytest.raises(ConfigError, match="max_windows must be >= 1"):
        quality.perplexity(model, ids, window=32, max_windows=0)


def test_calibration_and_evaluation_texts_are_disjoint_halves_of_the_novel():
    calibration, evaluation = corpus.calibration_text(), corpus.evaluation_text()
    assert calibration.startswith("Chapter 1\n\n") and evaluation.startswith("Chapter 13\n\n")
    assert "Chapter 13" not in calibration and "Chapter 12\n" not in evaluation
    assert len(calibration) > 200_000 and len(evaluation) > 200_000
    # no paragraph of one is in the other (short ones such as '"Yes."' can repeat in a novel)
    long_paragraphs = [p for p in evaluation.split("\n\n") if len(p) > 80]
    assert len(long_paragraphs) > 300 and not any(p in calibration for p in long_paragraphs)
    # every chapter is in exactly one part, and together they are the whole novel
    chapters = corpus.chapters()
    assert sorted(chapters) == list(range(1, 25))
    assert all((chapters[n] in calibration) != (chapters[n] in evaluation) for n in chapters)
    assert "  " not in evaluation and "\n\n\n" not in evaluation  # line wraps undone


def test_token_windows_cut_the_tokenized_text():
    class Characters:  # a tokenizer of one token per character
        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": [ord(c) for c in text]}

    text = corpus.evaluation_text()
    windows = corpus.token_windows(Characters(), text, window=100, max_windows=5)
    assert windows.shape == (5, 100) and windows.dtype == torch.long
    assert "".join(map(chr, windows.flatten().tolist())) == text[:500]
    assert corpus.token_windows(Characters(), text, window=1000).shape == (len(text) // 1000, 1000)
    with pytest.raises(ConfigError, match="fewer than one window"):
        corpus.token_windows(Characters(), "short", window=100)
