"""Manifests of output directories, atomic replacement and the leftovers of killed writers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from nnopt.errors import IntegrityError, ModelFormatError, OutputError
from nnopt.io import atomic
from nnopt.io.atomic import (
    atomic_directory,
    clean_leftovers,
    commit_guard,
    exchange_paths,
    recover_directory,
    sibling_name,
)
from nnopt.io.manifest import MANIFEST_FILE, list_files, verify_directory, write_manifest

NAMES = ("report.json", "data.bin")  # report.json marks the kind of output in these tests


def _write(directory, files):
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)


def _make(path, files=None, **kwargs):
    with atomic_directory(path, replace_if=NAMES, **kwargs) as tmp:
        _write(tmp, files or {"report.json": b"{}", "data.bin": b"\x00\x01"})
    return path


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _flip(file, offset=0):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def test_manifest_lists_every_other_file_recursively_sorted_with_hash_and_size(tmp_path):
    files = {"b.txt": b"bee", "a/z.bin": b"\x00" * 3, "a/b/c.json": b"{}", ".hidden": b"h"}
    _write(tmp_path, files)
    doc = write_manifest(tmp_path)
    assert list(doc["files"]) == sorted(files) == [".hidden", "a/b/c.json", "a/z.bin", "b.txt"]
    for rel, data in files.items():
        assert doc["files"][rel] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((tmp_path / MANIFEST_FILE).read_text()) == doc
    assert MANIFEST_FILE not in list_files(tmp_path)
    assert verify_directory(tmp_path).ok and verify_directory(tmp_path).checked == 4


def test_atomic_directory_writes_the_manifest_last_unless_told_not_to(tmp_path):
    out = _make(tmp_path / "out", {"report.json": b"{}", "sub/data.bin": b"123"})
    assert sorted(json.loads((out / MANIFEST_FILE).read_text())["files"]) == ["report.json", "sub/data.bin"]
    bare = _make(tmp_path / "bare", manifest=False)
    assert not (bare / MANIFEST_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "out"]  # no temporaries left


@pytest.mark.parametrize("rel", ["report.json", "sub/data.bin"])
def test_a_flipped_byte_missing_or_extra_file_is_named(tmp_path, rel):
    out = _make(tmp_path / "out", {"report.json": b'{"a": 1}', "sub/data.bin": b"123456"})
    _flip(out / rel, offset=2)
    result = verify_directory(out)
    assert not result.ok and result.changed == (rel,) and not result.missing and not result.extra
    assert rel in str(result) and "MISMATCH" in str(result)
    (out / rel).unlink()
    (out / "sub" / "new.txt").write_text("x")
    result = verify_directory(out)
    assert result.changed == () and result.missing == (rel,) and result.extra == ("sub/new.txt",)


def test_an_edited_or_garbled_manifest_is_reported_as_changed(tmp_path):
    out = _make(tmp_path / "out")
    doc = json.loads((out / MANIFEST_FILE).read_text())
    doc["files"]["data.bin"]["sha256"] = "0" * 64  # a forged hash no longer matches the list's own sha256
    (out / MANIFEST_FILE).write_text(json.dumps(doc))
    result = verify_directory(out)
    assert MANIFEST_FILE in result.changed and "was edited" in result.notes[0]
    (out / MANIFEST_FILE).write_text("{not json")
    result = verify_directory(out)
    assert not result.ok and result.changed == (MANIFEST_FILE,) and "not valid JSON" in result.notes[0]


def test_verify_needs_a_directory_with_a_manifest(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelFormatError, match="is not a directory"):
        verify_directory(tmp_path / "file")
    with pytest.raises(ModelFormatError, match="does not exist"):
        verify_directory(tmp_path / "nowhere")
    with pytest.raises(ModelFormatError, match="no manifest.json"):
        verify_directory(tmp_path)


def test_an_earlier_output_with_a_manifest_is_replaced_but_foreign_files_are_not(tmp_path):
    out = _make(tmp_path / "out")
    _make(out, {"report.json": b"[1]", "data.bin": b"new"})  # replace_if does not name manifest.json
    assert (out / "data.bin").read_bytes() == b"new" and verify_directory(out).ok
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        _make(out)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "fallback"])
def test_replacing_leaves_no_siblings_either_way(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    out = _make(tmp_path / "out")
    for i in range(3):
        _make(out, {"report.json": b"{}", "data.bin": bytes([i])})
    assert (out / "data.bin").read_bytes() == b"\x02" and verify_directory(out).ok
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exchange_swaps_two_directories_where_the_system_can(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    if not exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the fallback is tested above")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_a_failing_commit_guard_writes_nothing_and_keeps_the_old_output(tmp_path):
    out = _make(tmp_path / "out")
    before = (out / MANIFEST_FILE).read_bytes()

    def changed():
        raise IntegrityError("the input changed")

    with pytest.raises(IntegrityError), commit_guard(changed):
        _make(out, {"report.json": b"{}", "data.bin": b"other"})
    assert (out / MANIFEST_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    _make(out, {"report.json": b"{}", "data.bin": b"other"})  # the guard ended with its block
    assert (out / "data.bin").read_bytes() == b"other"


def test_stale_leftovers_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    out = _make(tmp_path / "out")
    dead, host = _dead_pid(), atomic._host_tag()
    stale = [tmp_path / f".out.tmp-{host}-{dead}-0123abcd", tmp_path / f".out.del-{host}-{dead}-0123abce"]
    live = [tmp_path / f".out.tmp-{host}-{os.getppid()}-0123abcf",  # a live process (pytest's parent)
            tmp_path / ".out.tmp-89abcdef", tmp_path / f".out.tmp-ffffffff-{dead}-0123abd0"]  # cannot be attributed
    old_legacy = tmp_path / ".out.old-fedcba98"
    unrelated = [tmp_path / f".other.tmp-{host}-{dead}-0123abd1", tmp_path / ".out.tmp-notours"]
    for p in (*stale, *live, old_legacy, *unrelated):
        p.mkdir()
        (p / "f").write_text("x")
    a_day_ago = time.time() - 2 * atomic.FOREIGN_STALE_SECONDS
    os.utime(old_legacy, (a_day_ago, a_day_ago))
    removed = clean_leftovers(out)
    assert sorted(removed) == sorted([*stale, old_legacy])
    assert all(p.exists() for p in (*live, *unrelated, out))


def test_an_output_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    out = _make(tmp_path / "out", {"report.json": b"{}", "data.bin": b"previous"})
    dead, host = _dead_pid(), atomic._host_tag()
    aside = tmp_path / f".out.old-{host}-{dead}-0123abcd"
    os.rename(out, aside)  # what the fallback's first rename leaves when the writer dies right after it
    assert recover_directory(out) and (out / "data.bin").read_bytes() == b"previous"
    assert not aside.exists() and not recover_directory(out)  # nothing more to do


def test_the_next_write_recovers_first_and_never_restores_an_incomplete_copy(tmp_path):
    out = _make(tmp_path / "out", {"report.json": b"{}", "data.bin": b"previous"})
    dead, host = _dead_pid(), atomic._host_tag()
    os.rename(out, tmp_path / f".out.old-{host}-{dead}-0123abcd")
    with pytest.raises(OutputError, match="exists"):  # recovered first, so it is an existing output again
        with atomic_directory(out, replace_if=None):
            pass
    assert (out / "data.bin").read_bytes() == b"previous"
    # A half-deleted copy (its files no longer match its manifest) is garbage, not a candidate.
    broken = tmp_path / f".out.old-{host}-{dead}-0123abce"
    os.rename(out, broken)
    (broken / "data.bin").unlink()
    assert not recover_directory(out) and not out.exists()
    _make(out)
    assert verify_directory(out).ok and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sibling_names_carry_host_and_pid(tmp_path):
    name = sibling_name(tmp_path / "model", "tmp").name
    assert name.startswith(f".model.tmp-{atomic._host_tag()}-{os.getpid()}-")
