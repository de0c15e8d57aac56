"""`nnopt prune` end to end on a saved SimpleNet."""

from __future__ import annotations

import json

import pytest
import torch

import nnopt
from nnopt.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained_simplenet):
    path = tmp_path_factory.mktemp("in") / "simplenet"
    nnopt.save_model(trained_simplenet, path)
    return path


def _hidden_sparsity(model):
    # a layer may hold a CSR kernel where it measured faster (a timing-dependent choice): read it densely
    ws = [getattr(layer, "dense_weight", lambda layer=layer: layer.weight)() for layer in
          (model.features[0], model.features[2])]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize(
    ("args", "sparsity"),
    [
        (["--sparsity", "0.8"], 0.8),
        (["--sparsity", "0.8", "--global"], 0.8),
        (["--sparsity", "0.8", "--allocation", "lamp"], 0.8),
        (["--nm", "2:4"], 0.5),
        (["--sparsity", "0.8", "--schedule", "gradual", "--epochs", "6", "--data", "digits"], 0.8),
    ],
)
def test_prune_variants_save_and_reload(saved, tmp_path, capsys, args, sparsity):
    out = tmp_path / "out"
    assert main(["prune", str(saved), *args, "-o", str(out)]) == 0
    assert "compression ratio" in capsys.readouterr().out
    model = nnopt.load_model(out)
    assert _hidden_sparsity(model) == pytest.approx(sparsity, abs=2e-3)
    meta = json.loads((out / "nnopt.json").read_text())
    names = [p["name"] for p in meta["applied"]]
    assert names[-1] == "sparse-kernels" and names[-2].startswith("prune-")
    assert set(meta["applied"][-1]["details"]["layers"]) == {"features.0", "features.2", "classifier"}
    assert meta["compression_ratio"] > 1.0  # packed format: zeros are not stored


def test_saved_pruned_model_gives_identical_outputs(saved, tmp_path, digits):
    out = tmp_path / "p"
    assert main(["prune", str(saved), "--threshold", "0.05", "-o", str(out), "--format", "safetensors",
                 "--kernel-batch", "0"]) == 0
    reloaded = nnopt.load_model(out)
    expected = nnopt.prune(nnopt.load_model(saved), nnopt.ThresholdPruneConfig(threshold=0.05))
    with torch.no_grad():
        assert torch.equal(reloaded(digits.test.x), expected(digits.test.x))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
        (["--nm", "4:4"], "1 <= N < M"),
        (["--nm", "2:5"], "does not divide"),
        (["--nm", "two:four"], "N:M"),
        (["--sparsity", "0.5", "--layers", "nope"], "matches no layer"),
        (["--sparsity", "0.5", "--schedule", "gradual"], "needs data"),
        (["--threshold", "0.1", "--schedule", "gradual", "--data", "digits"], "needs --sparsity"),
        (["--threshold", "-1"], "threshold"),
        (["--sparsity", "0.5", "--layers", "type:ReLU"], "no float weight"),
    ],
)
def test_bad_prune_input_writes_nothing(saved, tmp_path, expect_error, args, message):
    out = tmp_path / "never"
    expect_error(["prune", str(saved), *args, "-o", str(out)], message)
    assert not out.exists()


def test_prune_refuses_to_write_onto_its_input(saved, capsys):
    before = (saved / "model.safetensors").read_bytes()
    assert main(["prune", str(saved), "--sparsity", "0.5", "-o", str(saved), "--overwrite"]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert (saved / "model.safetensors").read_bytes() == before
