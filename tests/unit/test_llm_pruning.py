"""LLM pruning (magnitude, Wanda, SparseGPT; unstructured and N:M) per matrix and on the layer-by-layer engine
(tiny random Llama models only)."""

import json

import pytest
import torch
from checkpoint_files import checkpoint_tensors as _tensors

from nnopt.errors import ConfigError
from nnopt.llm.gptq import hessian
from nnopt.llm.layerwise import InputStats
from nnopt.llm.pruning import (
    CONFIG_ENTRY,
    PruneConfig,
    magnitude_mask,
    prune_checkpoint,
    sparsegpt_prune,
    wanda_prune,
)
from nnopt.llm.streaming import partial_dir
from nnopt.llm.synthetic import LlamaShape, write_synthetic_llama

SHAPE = LlamaShape(96, 160, 2, 4, 2, 128, "float32", max_position_embeddings=64)
TOKENS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _inputs(n=2048, d=160, seed=0, dead=True):
    """Correlated inputs with a few outlier channels (as LLM activations have), one dead input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3
    x[:, [5, 40, 99]] *= 25
    if dead:
        x[:, 7] = 0
    return x, torch.randn(48, d, generator=g) * 0.02


def _stats(x):
    return InputStats(hessian(x), x.abs().amax(dim=0), x.shape[0])


def _error(w, pruned, x):
    return float(((w - pruned) @ x.t()).norm())


def _assert_nm(weight, n, m):
    nonzero = (weight != 0).reshape(-1, m).sum(dim=1)
    assert bool((nonzero <= n).all()), "a group keeps more than N weights"


@pytest.mark.parametrize("n_m", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_calibrated_methods_beat_magnitude_on_the_output(n_m):
    x, w = _inputs()
    magnitude = w.masked_fill(~magnitude_mask(w, 0.5, n_m), 0)
    wanda = wanda_prune(w, _stats(x), 0.5, n_m)
    sparsegpt = sparsegpt_prune(w, hessian(x), 0.5, n_m)
    e_mag, e_wanda, e_sgpt = (_error(w, p, x) for p in (magnitude, wanda, sparsegpt))
    assert e_wanda < 0.8 * e_mag, (e_wanda, e_mag)
    assert e_sgpt < 0.9 * e_wanda, (e_sgpt, e_wanda)
    for pruned in (magnitude, wanda, sparsegpt):
        assert pruned.dtype == w.dtype and pruned.shape == w.shape
        assert int((pruned == 0).sum()) == w.numel() // 2
        if n_m:
            _assert_nm(pruned, *n_m)
    for pruned in (magnitude, wanda):  # per output row: every row exactly half
        assert ((pruned == 0).sum(dim=1) == 80).all()
        kept = pruned != 0
        assert torch.equal(pruned[kept], w[kept])  # no weight update
    assert bool((wanda[:, 7] == 0).all()) and bool((sparsegpt[:, 7] == 0).all())  # the dead input goes first
    assert not torch.equal(sparsegpt[sparsegpt != 0], w[sparsegpt != 0])  # SparseGPT updates the kept weights


def test_exact_counts_for_odd_sparsities_and_other_patterns():
    x, w = _inputs(d=160, dead=False)  # a dead input's 48 zeros would exceed a 1% share
    for sparsity in (0.3, 0.7, 0.01):
        per_row = round(sparsity * 160)
        assert ((~magnitude_mask(w, sparsity)).sum(dim=1) == per_row).all()
        assert ((wanda_prune(w, _stats(x), sparsity) == 0).sum(dim=1) == per_row).all()
        # SparseGPT: each block of columns prunes its exact share, so the matrix's count is exact
        assert int((sparsegpt_prune(w, hessian(x), sparsity, block=64) == 0).sum()) == round(sparsity * w.numel())
    for n, m in ((1, 4), (4, 8)):
        _assert_nm(sparsegpt_prune(w, hessian(x), n_m=(n, m)), n, m)
        _assert_nm(wanda_prune(w, _stats(x), n_m=(n, m)), n, m)
    keep = magnitude_mask(torch.tensor([[0.1, -2.0, 0.3, 4.0, 5.0, -6.0, 0.0, 0.01]]), n_m=(2, 4))
    assert keep.int().tolist() == [[0, 1, 0, 1, 1, 1, 0, 0]]


def test_sparsegpt_lazy_blocks_are_exact_and_an_identity_hessian_is_magnitude():
    x, w = _inputs(d=160)
    h = hessian(x)
    # with N:M the mask does not depend on the block, so lazy updates must give the same result
    a = sparsegpt_prune(w, h, n_m=(2, 4), block=4)
    b = sparsegpt_prune(w, h, n_m=(2, 4), block=160)
    assert torch.allclose(a, b, atol=1e-6, rtol=0) and torch.equal(a == 0, b == 0)
    # uncorrelated inputs: no update to spread, SparseGPT is magnitude pruning
    eye = torch.eye(160, dtype=torch.float64)
    nm = sparsegpt_prune(w, eye, n_m=(2, 4))
    assert torch.equal(nm, w.masked_fill(~magnitude_mask(w, n_m=(2, 4)), 0))
    before = w.clone()
    sparsegpt_prune(w, h)
    wanda_prune(w, _stats(x))
    assert torch.equal(w, before)  # inputs untouched


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.0}, "sparsity"), ({"sparsity": 1.0}, "sparsity"), ({"sparsity": 1.5}, "sparsity"),
    ({"sparsity": True}, "sparsity"), ({"n_m": (4, 4)}, "1 <= N < M"), ({"n_m": (0, 4)}, "1 <= N < M"),
    ({"n_m": (5, 4)}, "1 <= N < M"), ({"n_m": (2,)}, "two integers"), ({"n_m": (2.0, 4)}, "two integers"),
    ({"n_m": (2, 4), "sparsity": 0.3}, "contradicts"), ({"method": "obs"}, "method"), ({"damp": 0}, "damp"),
    ({"block": 0}, "block"), ({"block": 6, "n_m": (2, 4)}, "multiple of M"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs).validate()


def test_bad_matrices_raise():
    x, w = _inputs(d=160)
    with pytest.raises(ConfigError, match="does not divide the input dimension 160 of mlp"):
        magnitude_mask(w, n_m=(2, 3), name="mlp")
    with pytest.raises(ConfigError, match="Hessian must be"):
        sparsegpt_prune(w, hessian(x)[:10, :10])
    with pytest.raises(ConfigError, match="NaN"):
        sparsegpt_prune(w, hessian(x) * float("nan"))
    assert PruneConfig("sparsegpt", sparsity=0.75, n_m=(1, 4)).target_sparsity == 0.75
    PruneConfig("sparsegpt", sparsity=0.75, n_m=(1, 4)).validate()


# ------------------------------------------------------------------------------------------ on the engine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny"
    write_synthetic_llama(path, SHAPE, seed=3, shard_bytes=60_000)
    return path



@pytest.fixture(scope="module")
def wanda_out(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "wanda"
    return out, prune_checkpoint(tiny_dir, out, PruneConfig("wanda"), tokens=TOKENS)


def test_wanda_checkpoint_loads_in_transformers_with_the_zeros(tiny_dir, wanda_out):
    from transformers import AutoModelForCausalLM

    out, result = wanda_out
    assert result["sparsity"] == 0.5 and result["pruned_weights"] == 14 and result["format"] == "safetensors"
    assert set(result["sparsity_by_projection"]) == set(PROJECTIONS)
    assert json.loads((out / "config.json").read_text())[CONFIG_ENTRY]["method"] == "wanda"
    source, written = _tensors(tiny_dir), _tensors(out)
    assert set(written) == set(source)
    for name, tensor in written.items():
        assert tensor.dtype == source[name].dtype
        if any(p in name for p in PROJECTIONS):
            assert ((tensor == 0).sum(dim=1) == tensor.shape[1] // 2).all(), name
            assert torch.equal(tensor[tensor != 0], source[name][tensor != 0])  # Wanda only zeroes
        else:
            assert torch.equal(tensor, source[name]), name  # embeddings, norms, lm_head unchanged
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    weight = model.model.layers[1].mlp.down_proj.weight
    assert float((weight == 0).float().mean()) == 0.5
    with torch.no_grad():
        logits = model(TOKENS[:2]).logits
    assert logits.shape == (2, 32, 128) and bool(torch.isfinite(logits).all())


def test_sparsegpt_2_4_and_magnitude_on_the_engine(tiny_dir, tmp_path):
    result = prune_checkpoint(tiny_dir, tmp_path / "sgpt", PruneConfig("sparsegpt", n_m=(2, 4)), tokens=TOKENS)
    assert result["pattern_holds"] and result["sparsity"] == 0.5
    source, written = _tensors(tiny_dir), _tensors(tmp_path / "sgpt")
    name = "model.layers.0.mlp.gate_proj.weight"
    _assert_nm(written[name], 2, 4)
    kept = written[name] != 0
    assert not torch.equal(written[name][kept], source[name][kept])  # the kept weights were updated

    # magnitude: no calibration tokens needed; only the selected layers are pruned
    result = prune_checkpoint(tiny_dir, tmp_path / "mag", PruneConfig("magnitude", sparsity=0.25),
                              layers=("re:mlp\\.down_proj",))
    assert result["pruned_weights"] == 2 and result["sparsity"] == 0.25
    written = _tensors(tmp_path / "mag")
    w = written["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(w == 0, ~magnitude_mask(source["model.layers.1.mlp.down_proj.weight"], 0.25))
    assert torch.equal(written["model.layers.1.mlp.up_proj.weight"], source["model.layers.1.mlp.up_proj.weight"])

    with pytest.raises(ConfigError, match="lm_head"):
        prune_checkpoint(tiny_dir, tmp_path / "head", PruneConfig("magnitude"), layers=("lm_head",))
    with pytest.raises(ConfigError, match="1 <= N < M"):
        prune_checkpoint(tiny_dir, tmp_path / "bad", PruneConfig("wanda", n_m=(4, 2)), tokens=TOKENS)
    assert not (tmp_path / "head").exists() and not (tmp_path / "bad").exists()


def test_an_interrupted_run_resumes_to_the_same_output(tiny_dir, wanda_out, tmp_path):
    out = tmp_path / "wanda"

    def stop(done, total, unit):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(tiny_dir, out, PruneConfig("wanda"), tokens=TOKENS, progress=stop)
    assert partial_dir(out).is_dir() and not out.exists()
    result = prune_checkpoint(tiny_dir, out, PruneConfig("wanda"), tokens=TOKENS)
    assert result["resumed_units"] == 1 and result["calibrated_layers"] == 1
    first, resumed = _tensors(wanda_out[0]), _tensors(out)
    assert all(torch.equal(first[name], resumed[name]) for name in first)


def test_sparsegpts_inverse_factor_is_the_one_it_computed_before_sharing_gptqs():
    # the SparseGPT rows of benchmarks/results/llm_quality.json were measured before sparsegpt_prune took
    # GPTQ's hessian_inverse: the factor must be the same, bit for bit
    from nnopt.llm.gptq import GPTQConfig, hessian_inverse

    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, 7] = 0.0  # a dead input
    h = 2 * x.t() @ x / 300
    old = h.clone()
    dead = torch.diagonal(old) == 0
    old[dead, dead] = 1.0
    torch.diagonal(old).add_(0.01 * float(torch.diagonal(old).mean()))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(old)), upper=True)
    new = hessian_inverse(h, GPTQConfig(damp=0.01))
    assert torch.equal(new.upper, upper) and torch.equal(new.dead, dead)
