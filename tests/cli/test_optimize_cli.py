"""`nnopt optimize PATH --recipe R.yaml`: the classic recipe end to end, and the bad-input contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nnopt
from nnopt.cli import main
from nnopt.lineage import get_lineage
from nnopt.recipe import load_recipe, recipe_to_yaml, recorded_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
THRESHOLD, BITS = 0.01, 8  # what recipes/classic.yaml promises
FAST = ["--latency-seconds", "0.02"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained_simplenet):
    path = tmp_path_factory.mktemp("in") / "simplenet"
    nnopt.save_model(trained_simplenet, path)
    return path


def test_classic_recipe_gives_what_its_steps_promise(saved, tmp_path, capsys, digits):
    out = tmp_path / "out"
    assert main(["optimize", str(saved), "--recipe", str(RECIPES / "classic.yaml"), "--data", "digits",
                 "-o", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    for row in ("accuracy (test split)", "non-zero weights", "file bytes", "compression ratio",
                "latency batch 1, ms", "latency batch 32, ms", "prune-threshold → quantize-weights"):
        assert row in printed, row
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
             for line in printed.splitlines() if line.startswith("│")}
    (latency,) = [v for k, v in cells.items() if k.startswith("latency batch 1,")]
    (energy,) = [v for k, v in cells.items() if k.startswith("energy per inference @1")]
    # energy at equal power follows the measured time: the slower model never shows less energy
    (e0, e1), (t0, t1) = map(float, energy), map(float, latency)
    assert (e0 <= e1 if t0 < t1 else e1 <= e0) and e0 / e1 == pytest.approx(t0 / t1, rel=0.02)
    assert "active power × measured time" in printed
    assert (out / "model.nnpk").is_file() and not (out / "model.safetensors").exists()  # weights_format: packed

    source, result = nnopt.load_model(saved), nnopt.load_model(out)  # reloads from safetensors/packed + JSON
    assert [p.name for p in get_lineage(result).applied] == ["prune-threshold", "quantize-weights"]
    for name in ("features.0", "features.2"):  # the hidden layers; the classifier is not pruned by default
        weight = source.get_submodule(name).weight.detach()
        layer = result.get_submodule(name)
        assert layer.bits == BITS and layer.weight_q.dtype == torch.int8
        below = weight.abs() < THRESHOLD
        assert bool(below.any())  # the test means something: there are weights to prune
        assert bool((layer.weight_q[below] == 0).all())  # every |w| < θ is zero
        # 8-bit codes reproduce the kept weights to within half a step of the layer's scale.
        step = weight.abs().max() / (2 ** (BITS - 1) - 1)
        assert float((layer.dense_weight() - weight)[~below].abs().max()) <= float(step) / 2 + 1e-6
    baseline, after = nnopt.accuracy(source, digits.test), nnopt.accuracy(result, digits.test)
    assert after >= baseline - 0.01
    meta = json.loads((out / "nnopt.json").read_text())
    assert meta["metrics"]["accuracy"] == pytest.approx(after)
    assert (out / "model.nnpk").stat().st_size < (saved / "model.safetensors").stat().st_size / 3

    # The recipe is recorded: recipe.yaml can be recovered from the output alone.
    assert recorded_recipe(out) == load_recipe(RECIPES / "classic.yaml")
    assert "kind: prune-threshold" in recipe_to_yaml(recorded_recipe(out))

    # --overwrite replaces an earlier output; without it, an existing output is refused.
    assert main(["optimize", str(saved), "--recipe", str(RECIPES / "classic.yaml"), "-o", str(out),
                 "--overwrite", *FAST]) == 0
    assert "accuracy" not in capsys.readouterr().out.split("parameters")[0]  # no --data: no accuracy row


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "R.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps:\n  - kind: prune-magic\n", "R.yaml: steps[0]: unknown kind 'prune-magic'; known kinds: cluster,"),
        ("steps:\n  - kind: prune-threshold\n  - kind: quantize-weights\n    bitz: 4\n",
         "R.yaml: steps[1] (kind quantize-weights): unknown key 'bitz'; allowed: bits, compute,"),
        ("steps:\n  - kind: quantize-weights\n    bits: eight\n",
         "steps[0] (kind quantize-weights): WeightQuantConfig.bits: expected int, got str 'eight'"),
        ("steps:\n  - kind: prune-threshold\n  - kind: int8-static\n",
         "R.yaml: steps[1] (kind int8-static) needs data for calibration: add --data digits"),
        ("name: x\nsteps:\n  - kind: prune-threshold\n    threshold: [0.01\n",
         "R.yaml: line 5, column 1: invalid YAML"),
        ("steps: []\n", "R.yaml: steps is empty"),
        ("steps:\n  - kind: prune-threshold\nformat: packed\n", "R.yaml: unknown key 'format'"),
    ],
    ids=["unknown-kind", "unknown-key", "wrong-type", "missing-data", "bad-yaml", "empty", "top-level-key"],
)
def test_bad_recipes_are_one_error_line_and_nothing_written(saved, tmp_path, expect_error, text, message):
    out = tmp_path / "out"
    expect_error(["optimize", str(saved), "--recipe", _recipe(tmp_path, text), "-o", str(out)], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.yaml"]  # no output, no temporary directory


def test_bad_paths_and_data_are_refused_before_any_work(saved, tmp_path, expect_error):
    recipe = str(RECIPES / "classic.yaml")
    out = tmp_path / "out"
    expect_error(["optimize", str(saved), "--recipe", str(tmp_path / "none.yaml"), "-o", str(out)],
                 "no such recipe file")
    expect_error(["optimize", str(saved), "--recipe", recipe, "--data", "mnist", "-o", str(out)],
                 "unknown data set 'mnist'")
    expect_error(["optimize", str(tmp_path / "missing"), "--recipe", recipe, "-o", str(out)], "no such file")
    expect_error(["optimize", str(saved), "--recipe", recipe, "-o", str(saved)], "overlaps the input")
    inside = _recipe(tmp_path, (RECIPES / "classic.yaml").read_text())
    expect_error(["optimize", str(saved), "--recipe", inside, "-o", str(tmp_path)], "overlaps the input")
    expect_error(["optimize", str(saved), "--recipe", recipe, "-o", str(out), "--latency-seconds", "-1"],
                 "--latency-seconds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.yaml"]
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    expect_error(["optimize", str(saved), "--recipe", recipe, "-o", str(out)], "exists")
    expect_error(["optimize", str(saved), "--recipe", recipe, "-o", str(out), "--overwrite"],
                 "not an earlier nnopt output")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
