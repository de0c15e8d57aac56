"""Commands on a model saved from the user's own nn.Module, with the user's data in a file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nnopt
from nnopt.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def saved_user_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # where the user's package lives
    import generated_data
    import user_models

    torch.manual_seed(0)
    model = user_models.TimeSeriesCNN(width=8)
    x, y = generated_data.signals(160, seed=0, length=64)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    np.save(tmp_path / "inputs.npy", x.numpy())
    nnopt.save_model(model, tmp_path / "model", factory="user_models:TimeSeriesCNN", factory_kwargs={"width": 8})
    return tmp_path


def test_commands_refuse_a_user_model_unless_imports_are_trusted(saved_user_model, expect_error):
    expect_error(["profile", str(saved_user_model / "model")], "--trust-import")


def test_structured_pruning_of_a_user_model_with_an_unlabelled_file(saved_user_model, capsys):
    out = saved_user_model / "pruned"
    code = main(["prune", str(saved_user_model / "model"), "--trust-import", "--structured", "--ratio", "0.5",
                 "--importance", "l1", "--data", str(saved_user_model / "inputs.npy"), "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "top-1 agreement with the input" in printed
    meta = json.loads((out / "nnopt.json").read_text())
    assert meta["config"]["input_shape"] == [3, 64]  # learnt from the data: profiles need no --data later
    assert main(["profile", str(out), "--trust-import", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    convs = [layer for layer in profile["layers"] if layer["type"] == "Conv1d"]
    assert [layer["shape"][0] for layer in convs] == [4, 8, 8]  # half of 8, 16, 16 channels


def test_quantizing_a_user_model_with_a_labelled_file_reports_accuracy(saved_user_model, capsys):
    code = main(["quantize", str(saved_user_model / "model"), "--trust-import", "--scheme", "int8-weight",
                 "--data", str(saved_user_model / "data.npz"), "-o", str(saved_user_model / "q")])
    assert code == 0 and "accuracy" in capsys.readouterr().out
    reloaded = nnopt.load_model(saved_user_model / "q", trust_import=True)
    assert reloaded(torch.randn(2, 3, 64)).shape == (2, 5)


def test_optimize_a_user_model_with_a_recipe_and_an_unlabelled_file(saved_user_model, capsys):
    recipe = saved_user_model / "recipe.yaml"
    recipe.write_text("name: small\nsteps:\n  - kind: prune-structured\n    ratio: 0.5\n    importance: l1\n"
                      "    finetune_epochs: 1\n  - kind: fold-batchnorm\n")
    out = saved_user_model / "optimized"
    code = main(["optimize", str(saved_user_model / "model"), "--trust-import", "--recipe", str(recipe),
                 "--data", str(saved_user_model / "inputs.npy"), "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "top-1 agreement with the input" in printed  # no labels: fidelity to the input
    reloaded = nnopt.load_model(out, trust_import=True)
    assert [p.name for p in reloaded._nnopt_lineage.applied] == ["prune-structured", "fold-batchnorm"]
    assert reloaded.features[0].out_channels == 4

