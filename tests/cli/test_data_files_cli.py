"""`--data FILE` on the command line: prune with an .npz, quantize with a .csv, auto with an image folder,
unlabelled files reporting fidelity to the input model, and one error line for a malformed file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nnopt
from nnopt.cli import main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread, above all on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained_simplenet):
    path = tmp_path_factory.mktemp("in") / "simplenet"
    nnopt.save_model(trained_simplenet, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("data")
    x, y = digits.test.x.numpy(), digits.test.y.numpy()  # standardized digits rows, as SimpleNet was trained on
    np.savez(root / "labelled.npz", x=x, y=y)
    np.save(root / "inputs.npy", x)
    header = ",".join(f"p{i}" for i in range(64)) + ",label"
    rows = "".join(",".join(f"{v:.5f}" for v in row) + f",{label}\n" for row, label in zip(x, y))
    (root / "rows.csv").write_text(header + "\n" + rows)
    return root


def test_prune_with_a_labelled_npz_reports_accuracy(saved, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(saved), "--sparsity", "0.5", "--epochs", "1", "--data", str(files / "labelled.npz"),
                 "--kernel-batch", "0", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "agreement" not in text
    assert 0.5 < json.loads((out / "nnopt.json").read_text())["metrics"]["accuracy"] <= 1.0


def test_prune_with_unlabelled_npy_recovers_by_distillation_and_reports_fidelity(saved, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(saved), "--sparsity", "0.9", "--epochs", "2", "--data", str(files / "inputs.npy"),
                 "--kernel-batch", "0", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement with the input" in text and "recovery distilled from the input model" in text
    metrics = json.loads((out / "nnopt.json").read_text())["metrics"]
    oneshot = nnopt.prune(nnopt.load_model(saved), nnopt.MagnitudePruneConfig(sparsity=0.9))
    x = torch.from_numpy(np.load(files / "inputs.npy"))
    assert metrics["agreement"] > nnopt.fidelity(oneshot, nnopt.load_model(saved), x).agreement


def test_quantize_with_a_csv(saved, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", str(saved), "--scheme", "int8-static", "--calib", "64", "--data",
                 str(files / "rows.csv"), "-o", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert json.loads((out / "nnopt.json").read_text())["metrics"]["accuracy"] > 0.8


def test_quantize_with_a_chosen_label_column_reads_it(saved, files, tmp_path, expect_error):
    # p0 holds standardized pixel values: read as the label column (the default, label, works above) it is refused
    expect_error(["quantize", str(saved), "--scheme", "int8-static", "--data", str(files / "rows.csv"),
                  "--label-column", "p0", "-o", str(tmp_path / "o")], "rows.csv: labels must be integer class ids")


def test_malformed_file_is_one_error_line(saved, tmp_path, expect_error):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n3,4\n")
    expect_error(["prune", str(saved), "--sparsity", "0.5", "--data", str(bad), "-o", str(tmp_path / "o")],
                 "bad.csv: line 3 has 2 values, the header has 3 columns")
    assert not (tmp_path / "o").exists()
    expect_error(["quantize", str(saved), "--scheme", "int8-static", "--data", str(tmp_path / "none.npz"),
                  "-o", str(tmp_path / "o")], "unknown data set")
    expect_error(["prune", str(saved), "--sparsity", "0.5", "--data", str(bad), "--image-size", "a", "-o",
                  str(tmp_path / "o")], "--image-size takes")


def test_auto_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label, shade in (("dark", 60), ("light", 190)):
        (root / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(shade, 30, (8, 8)), 0, 255).astype("uint8")
            Image.fromarray(pixels, mode="L").save(root / label / f"{i}.png")
    data = nnopt.load_data(root)
    model = nnopt.create_model("resnet8", num_classes=2, widths=(4, 8), seed=0)
    nnopt.train(model, data.train, nnopt.TrainConfig(epochs=3, seed=0), progress=False)
    path = tmp_path / "model"
    nnopt.save_model(model, path)
    out = tmp_path / "auto"
    code = main(["auto", str(path), "--data", str(root), "--objective", "size", "--max-drop", "0.5",
                 "--budget-minutes", "0.02", "--finetune-epochs", "1", "--latency-seconds", "0.01", "-o", str(out)])
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "accuracy" and report["dataset"]["name"] == "images"
    if code == 0:
        assert f"--data {root}" in (out / "recipe.yaml").read_text()
