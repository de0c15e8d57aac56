"""`nnopt verify`: OK for an untouched output, exit 1 naming any changed, missing or extra file."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import nnopt
from nnopt.cli import main
from nnopt.io.atomic import atomic_directory, write_bytes_durable
from nnopt.io.manifest import write_manifest


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A saved model, and a report directory written the way the demo writes its own: nested
    model directories plus report files, inside one atomic directory."""
    root = tmp_path_factory.mktemp("verify")
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.save_model(model, root / "model")
    with atomic_directory(root / "report", replace_if=("report.json",)) as tmp:
        nnopt.save_model(model, tmp / "baseline")
        nnopt.save_model(nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.05)), tmp / "pruned",
                         weights_format="packed")
        write_bytes_durable(tmp / "report.json", json.dumps({"variants": ["baseline", "pruned"]}).encode())
        write_bytes_durable(tmp / "report.md", b"# report\n")
    return root


def _copy(outputs, name, tmp_path):
    return shutil.copytree(outputs / name, tmp_path / name)


def _flip(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model", "report", "report/pruned"])
def test_an_untouched_output_verifies(outputs, name, capsys):
    assert main(["verify", str(outputs / name)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: ") and "files match manifest.json" in out


@pytest.mark.parametrize(
    ("name", "victim"),
    [("model", "model.safetensors"), ("model", "nnopt.json"), ("model", "manifest.json"),
     ("report", "report.json"), ("report", "report.md"), ("report", "baseline/model.safetensors"),
     ("report", "pruned/model.nnpk"), ("report", "pruned/nnopt.json"), ("report", "baseline/manifest.json")],
)
def test_one_flipped_byte_in_any_file_fails_naming_it(outputs, tmp_path, capsys, name, victim):
    out = _copy(outputs, name, tmp_path)
    _flip(out / victim)
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert text.startswith("MISMATCH") and f"changed: {victim}" in text


def test_missing_and_extra_files_are_listed(outputs, tmp_path, capsys):
    out = _copy(outputs, "report", tmp_path)
    (out / "report.md").unlink()
    (out / "baseline" / "notes.txt").write_text("mine")
    assert main(["verify", str(out), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["missing"] == ["report.md"] and doc["extra"] == ["baseline/notes.txt"]
    assert doc["changed"] == []


def test_weights_that_disagree_with_the_model_record_fail_even_with_a_rewritten_manifest(outputs, tmp_path, capsys):
    out = _copy(outputs, "model", tmp_path)
    _flip(out / "model.safetensors")
    write_manifest(out)  # the manifest now agrees with the tampered file; nnopt.json does not
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "changed: model.safetensors" in text and "does not match the one in nnopt.json" in text
    meta = json.loads((out / "nnopt.json").read_text())
    assert meta["files"]["model.safetensors"]["sha256"] != hashlib.sha256((out / "model.safetensors").read_bytes()
                                                                          ).hexdigest()


def test_nothing_to_verify_against_is_an_error(outputs, tmp_path, expect_error):
    (tmp_path / "file.txt").write_text("x")
    expect_error(["verify", str(tmp_path / "file.txt")], "is not a directory")
    expect_error(["verify", str(tmp_path / "nowhere")], "does not exist")
    bare = _copy(outputs, "model", tmp_path)
    (bare / "manifest.json").unlink()
    expect_error(["verify", str(bare)], "no manifest.json")


def test_verify_knows_the_model_directory_file_names():
    from nnopt.io import model_dir
    from nnopt.pipeline import verify_run

    assert verify_run.META_FILE == model_dir.META_FILE
    assert set(verify_run.WEIGHTS_FILES) == set(model_dir.WEIGHT_FILES.values())


def test_a_record_naming_a_path_outside_is_reported_not_read(tmp_path, capsys):
    import json

    import nnopt
    from nnopt.cli import main

    nnopt.save_model(nnopt.create_model("simplenet", seed=0), tmp_path / "m")
    meta_path = tmp_path / "m" / "nnopt.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["/etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
    meta["files"]["../outside"] = {"bytes": 1, "sha256": "0" * 64}
    meta_path.write_text(json.dumps(meta))
    assert main(["verify", str(tmp_path / "m")]) == 1
    out = capsys.readouterr().out
    assert "/etc/hostname" in out and "not a weights file" in out
