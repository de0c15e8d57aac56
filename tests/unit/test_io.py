import json
import pickle

import pytest
import torch

import nnopt
from nnopt.errors import ModelFormatError, OutputError, UnsafeFileError
from nnopt.io import read_meta, save_model
from nnopt.io.atomic import atomic_directory
from nnopt.loading import load_model


def _variants(model):
    pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.05))
    return {
        "baseline": model,
        "pruned": pruned,
        "quantized": nnopt.quantize(model, nnopt.WeightQuantConfig(bits=4, per_channel=True)),
        "pruned_quantized": nnopt.quantize(pruned),
    }


def test_round_trip_is_bit_exact(trained_simplenet, tmp_path, digits):
    for name, model in _variants(trained_simplenet).items():
        save_model(model, tmp_path / name)
        loaded = load_model(tmp_path / name)
        original, restored = model.state_dict(), loaded.state_dict()
        assert original.keys() == restored.keys()
        for key in original:
            assert original[key].dtype == restored[key].dtype
            assert torch.equal(original[key], restored[key]), key
        with torch.no_grad():
            assert torch.equal(model.eval()(digits.test.x), loaded(digits.test.x))


def test_cnn_round_trip(tmp_path):
    model = nnopt.quantize(nnopt.create_model("resnet8", seed=0).eval())
    save_model(model, tmp_path / "cnn")
    loaded = load_model(tmp_path / "cnn")
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_record_contents(trained_simplenet, tmp_path):
    saved = save_model(_variants(trained_simplenet)["pruned_quantized"], tmp_path / "m", metrics={"accuracy": 0.9})
    meta = read_meta(tmp_path / "m")
    assert meta["architecture"] == "simplenet"
    assert [p["name"] for p in meta["applied"]] == ["prune-threshold", "quantize-weights"]
    assert meta["applied"][0]["config"]["threshold"] == 0.05
    assert meta["metrics"] == {"accuracy": 0.9}
    assert meta["versions"]["torch"] == torch.__version__
    entry = meta["files"]["model.safetensors"]
    assert entry["bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size == saved.file_bytes
    assert len(entry["sha256"]) == 64


def test_quantized_file_is_about_four_times_smaller(trained_simplenet, tmp_path):
    base = save_model(trained_simplenet, tmp_path / "a").file_bytes
    quant = save_model(nnopt.quantize(trained_simplenet), tmp_path / "b").file_bytes
    assert quant <= base / 3


@pytest.mark.parametrize("payload", ["pickle", "torch"])
def test_pickle_files_are_refused(tmp_path, payload):
    path = tmp_path / "model.pt"
    if payload == "pickle":
        path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    else:
        torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(UnsafeFileError, match="could execute code"):
        load_model(path)


def test_pickle_content_is_refused_whatever_its_name(tmp_path):
    path = tmp_path / "weights.dat"
    path.write_bytes(pickle.dumps([1]))
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_model(path)


def test_h5_is_refused(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 32)
    with pytest.raises(UnsafeFileError, match="h5"):
        load_model(path)


def test_missing_foreign_and_corrupt_inputs(trained_simplenet, tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        load_model(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelFormatError, match="not an nnopt model directory"):
        load_model(tmp_path / "plain")
    save_model(trained_simplenet, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="sha256"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "nnopt.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="corrupt"):
        load_model(tmp_path / "m")


def test_garbage_safetensors_and_unknown_architecture(trained_simplenet, tmp_path):
    save_model(trained_simplenet, tmp_path / "m")
    meta_path = tmp_path / "m" / "nnopt.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # no checksum, so the safetensors parser itself must catch the garbage
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage")
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_model(tmp_path / "m")
    save_model(trained_simplenet, tmp_path / "n")
    meta = json.loads((tmp_path / "n" / "nnopt.json").read_text())
    meta["architecture"] = "alexnet"
    (tmp_path / "n" / "nnopt.json").write_text(json.dumps(meta))
    with pytest.raises(nnopt.NnoptError, match="unknown architecture 'alexnet'"):
        load_model(tmp_path / "n")


def test_shape_mismatch_is_a_format_error(trained_simplenet, tmp_path):
    save_model(trained_simplenet, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "nnopt.json").read_text())
    meta["config"]["hidden"] = [64, 31]
    (tmp_path / "m" / "nnopt.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"is torch.float32 \(.*\), the model needs torch.float32"):
        load_model(tmp_path / "m")


def test_refuses_to_write_onto_the_input_or_a_foreign_directory(trained_simplenet, tmp_path):
    save_model(trained_simplenet, tmp_path / "in")
    for target in (tmp_path / "in", tmp_path / "in" / "sub", tmp_path):
        with pytest.raises(OutputError, match="overlaps the input"):
            save_model(trained_simplenet, target, inputs=[tmp_path / "in"], overwrite=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_model(trained_simplenet, tmp_path / "user", overwrite=True)
    assert (tmp_path / "user" / "notes.txt").read_text() == "precious"
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_model(trained_simplenet, tmp_path / "in")  # exists, overwrite not asked
    save_model(trained_simplenet, tmp_path / "in", overwrite=True)  # an earlier model may be replaced


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-way")
    assert list(tmp_path.iterdir()) == []


def test_save_requires_an_nnopt_model(tmp_path):
    with pytest.raises(ModelFormatError, match="not created by nnopt"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")


def _rewrite(model_dir, tensors=None, meta_edit=None):
    """Replace a saved model's tensors and/or record, keeping the sha256 consistent."""
    import hashlib

    from safetensors.torch import save as st_save

    meta_path = model_dir / "nnopt.json"
    meta = json.loads(meta_path.read_text())
    if tensors is not None:
        payload = st_save(tensors)
        (model_dir / "model.safetensors").write_bytes(payload)
        meta["files"]["model.safetensors"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    if meta_edit:
        meta_edit(meta)
    meta_path.write_text(json.dumps(meta))


def test_tampered_tensors_are_refused_even_with_a_matching_sha(trained_simplenet, tmp_path):
    q = nnopt.quantize(trained_simplenet)
    good = {k: v.contiguous() for k, v in q.state_dict().items()}
    cases = {
        "int32 codes": ({**good, "features.0.weight_q": good["features.0.weight_q"].to(torch.int32) + 900}, "int32"),
        "NaN bias": ({**good, "classifier.bias": torch.full_like(good["classifier.bias"], float("nan"))}, "NaN"),
        "zero scale": ({**good, "classifier.weight_scale": torch.zeros_like(good["classifier.weight_scale"])},
                       "scales must be finite"),
        "missing": ({k: v for k, v in good.items() if k != "classifier.bias"}, "missing"),
    }
    for i, (tensors, message) in enumerate(cases.values()):
        save_model(q, tmp_path / str(i))
        _rewrite(tmp_path / str(i), tensors=tensors)
        with pytest.raises(ModelFormatError, match=message):
            load_model(tmp_path / str(i))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["files"]["model.safetensors"].pop("sha256"), "sha256"),
        (lambda m: m.update(files=3), "'files'"),
        (lambda m: m.update(applied="x"), "'applied'"),
        (lambda m: m.update(config=[]), "'config'"),
        (lambda m: m.pop("architecture"), "'architecture'"),
        (lambda m: m["applied"].append({"name": "quantize-weights", "config": {}, "details": {"layers": {"nope": {}}}}),
         "cannot be built"),
        (lambda m: m["applied"].append({"name": "quantize-weights", "config": {},
                                        "details": {"layers": {"features.1": {}}}}), "ReLU"),
        (lambda m: m["applied"].append({"name": "magic", "config": {}}), "pass 'magic'"),
    ],
)
def test_malformed_records_name_the_problem(trained_simplenet, tmp_path, edit, message):
    save_model(trained_simplenet, tmp_path / "m")
    _rewrite(tmp_path / "m", meta_edit=edit)
    with pytest.raises(ModelFormatError, match=message):
        load_model(tmp_path / "m")


def test_non_finite_weights_cannot_be_quantized(trained_simplenet):
    broken = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.0))
    with torch.no_grad():
        broken.classifier.weight[0, 0] = float("nan")
    with pytest.raises(nnopt.NnoptError, match="NaN or infinite"):
        nnopt.quantize(broken)


def test_replacing_an_output_with_foreign_files_is_refused(trained_simplenet, tmp_path):
    save_model(trained_simplenet, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        save_model(trained_simplenet, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
