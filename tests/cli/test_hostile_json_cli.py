"""JSON files nested deeper than the parser can recurse are bad input (one error line), not a crash."""

from __future__ import annotations

import pytest

import nnopt
from nnopt.cli import main
from nnopt.io.json_file import JSONFileError, read_json

DEEP = "[" * 100_000 + "]" * 100_000


def test_read_json_names_every_way_a_file_is_unreadable(tmp_path):
    for name, data in (("deep.json", DEEP.encode()), ("bad.json", b"{not json"), ("latin.json", b"\xff\xfe{}")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(JSONFileError):
            read_json(tmp_path / name)
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}


@pytest.fixture
def model_dir(tmp_path):
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), tmp_path / "m")
    return tmp_path / "m"


def test_deep_report_and_bench_json_are_one_line_errors(model_dir, tmp_path, expect_error):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(DEEP)
    expect_error(["report", str(run)], "is not valid JSON")
    (tmp_path / "old.json").write_text(DEEP)
    expect_error(["bench", str(model_dir), "--compare", str(tmp_path / "old.json")], "is not a bench JSON")
    (model_dir / "nnopt.json").write_text(DEEP)
    expect_error(["profile", str(model_dir)], "is corrupt")


def test_a_deep_manifest_fails_verification_by_name(model_dir, capsys):
    (model_dir / "manifest.json").write_text(DEEP)
    assert main(["verify", str(model_dir)]) == 1
    assert "manifest.json is not valid JSON" in capsys.readouterr().out
