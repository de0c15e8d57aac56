"""`nnopt prune --structured` end to end: a smaller dense model, measured, saved and reloaded."""

from __future__ import annotations

import pytest
import torch

import nnopt
from nnopt.cli import main
from nnopt.lineage import get_lineage


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained_simplenet):
    path = tmp_path_factory.mktemp("in") / "simplenet"
    nnopt.save_model(trained_simplenet, path)
    return path


def test_structured_prune_halves_the_hidden_layers(saved, tmp_path, capsys, digits):
    out = tmp_path / "small"
    argv = ["prune", str(saved), "--structured", "--ratio", "0.5", "--importance", "gradient",
            "--finetune-epochs", "3", "--data", "digits", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "MACs per example" in printed and "latency batch 32" in printed and "features.0 64→32" in printed
    model = nnopt.load_model(out)
    assert model.features[0].weight.shape == (32, 64) and model.features[2].weight.shape == (16, 32)
    assert model.classifier.weight.shape == (10, 16)  # the output stays 10 wide
    with torch.no_grad():
        assert (model(digits.test.x).argmax(-1) == digits.test.y).float().mean() > 0.9


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "1.0"], "ratio must lie in [0, 1)"),
        ([], "--structured needs --ratio"),
        (["--ratio", "0.5", "--importance", "nope"], "unknown importance 'nope'"),
        (["--ratio", "0.5", "--importance", "l1", "--layers", "no.such.layer"], "matches no layer"),
        (["--ratio", "0.5", "--allocation", "lamp"], "uniform, global or energy"),
        (["--ratio", "0.5"], "importance 'gradient' needs data: add --data digits"),
    ],
)
def test_bad_structured_input_is_named_and_nothing_written(saved, tmp_path, expect_error, extra, message):
    out = tmp_path / "out"
    expect_error(["prune", str(saved), "--structured", *extra, "-o", str(out)], message)
    assert not out.exists()


def test_energy_allocation_from_the_cli(saved, tmp_path, capsys, monkeypatch):
    import nnopt.metrics.speed as speed
    import nnopt.pruning.structured.energy as energy
    from nnopt.metrics.layer_times import LayerTime

    # fixed layer times: the CLI's wiring is under test here, the timing in tests/unit/test_structured_energy.py
    monkeypatch.setattr(energy, "layer_costs", lambda model, inputs, names: {n: LayerTime(1e-3, 0.0, 1) for n in names})
    compare_latency = speed.compare_latency  # the before/after report: a short timing is enough to print it
    monkeypatch.setattr(speed, "compare_latency", lambda *a, **k: compare_latency(*a, **{**k, "min_seconds": 0.05}))
    out = tmp_path / "energy"
    argv = ["prune", str(saved), "--structured", "--ratio", "0.5", "--importance", "l1", "--allocation", "energy",
            "-o", str(out)]
    assert main(argv) == 0
    assert "MACs per example" in capsys.readouterr().out
    reloaded = nnopt.load_model(out)
    assert reloaded.classifier.weight.shape[0] == 10
    details = get_lineage(reloaded).applied[-1].details  # what the ranking used travels with the model
    assert details["energy_allocation"]["method"].startswith("estimated: active power × measured layer time")
    assert set(details["rounds"][0]["layer_ms"]) >= {"features.0", "features.2"}
