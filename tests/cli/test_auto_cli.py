"""`nnopt auto` on the command line: bad input fails first with one line, a run writes its output."""

from __future__ import annotations

import json

import pytest
import torch

import nnopt
from nnopt.cli import main
from nnopt.search import checkpoint_dir, validation_split


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread, above all on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits):
    fit, _ = validation_split(digits.train)
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, fit, nnopt.TrainConfig(epochs=10, seed=0), progress=False)
    path = tmp_path_factory.mktemp("in") / "simplenet"
    nnopt.save_model(model, path)
    return path


def _args(saved, out, *extra, max_drop="0.01", objective="size", data="digits"):
    return ["auto", str(saved), "--data", data, "--objective", objective, "--max-drop", max_drop, *extra,
            "-o", str(out)]


@pytest.mark.parametrize(("change", "message"), [
    ({"max_drop": "1.5"}, "--max-drop must be a fraction in [0, 1]"),
    ({"max_drop": "-0.01"}, "--max-drop must be a fraction in [0, 1]"),
    ({"max_drop": "half"}, "--max-drop takes a fraction"),
    ({"objective": "speed"}, "--objective must be one of size, latency, energy"),
    ({"data": "imagenet"}, "unknown data 'imagenet'"),
    ({"data": "sentences"}, "--data sentences is for sentence encoders"),
    ({"extra": ("--batch", "0")}, "--batch must be an integer >= 1"),
    ({"extra": ("--workers", "two")}, "--workers takes an integer"),
    ({"extra": ("--budget-minutes", "0")}, "--budget-minutes must be a number > 0"),
    ({"extra": ("--resume",)}, "--resume: no checkpoint"),
])
def test_bad_input_is_one_line_before_any_work(saved, tmp_path, expect_error, change, message):
    out = tmp_path / "out"
    extra = change.pop("extra", ())
    expect_error(_args(saved, out, *extra, **change), message)
    assert not out.exists() and not checkpoint_dir(out).exists()


def test_missing_model_output_onto_input_and_foreign_output_are_refused(saved, tmp_path, expect_error):
    expect_error(_args(tmp_path / "nope", tmp_path / "out"), "no such file or directory")
    expect_error(_args(saved, saved / "inside"), "overlaps the input")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    expect_error(_args(saved, foreign, "--overwrite"), "refusing to overwrite")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_run_writes_model_recipe_and_reports_and_can_be_replaced(saved, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _args(saved, out, "--finetune-epochs", "1", "--latency-seconds", "0.02", max_drop="0.03")
    code = main(argv)
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 3) and ("Chosen:" in printed) == (code == 0)
    assert report["objective"] == "size" and report["max_drop"] == 0.03 and report["front"]
    if code == 0:
        assert (out / "model" / "nnopt.json").is_file() and (out / "recipe.yaml").read_text().startswith("# nnopt auto")
    assert main(argv) == 2  # OUT exists: refused without --overwrite
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == code
