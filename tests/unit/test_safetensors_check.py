"""Hostile safetensors headers are refused, by nnopt's own check, before safetensors parses them."""

from __future__ import annotations

import hashlib
import json
import struct
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import save as st_save

import nnopt
from nnopt.errors import ModelFormatError
from nnopt.io.safetensors_check import (
    check_safetensors,
    check_safetensors_file,
    load_safetensors,
    load_safetensors_bytes,
)


def _file(header: object, buffer: bytes = b"", raw_header: bytes | None = None) -> bytes:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + buffer


def _f32(shape, begin):
    n = 4 * int(torch.tensor(shape).prod()) if shape else 4
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


HOSTILE = {
    "shorter than the prefix": (b"\x01\x02\x03", "the length prefix alone is 8"),
    "header beyond the file": (struct.pack("<Q", 1000) + b"{}", "only 2 follow the prefix"),
    "absurd header length": (struct.pack("<Q", 2**63) + b"{}", "more than the"),
    "header not UTF-8": (_file(None, raw_header=b'{"a\xff\xfe": 1}'), "not UTF-8"),
    "header not JSON": (_file(None, raw_header=b"{nope"), "not valid JSON"),
    "header a JSON list": (_file([1, 2]), "not an object"),
    "entry not an object": (_file({"w": 3}), "not an object"),
    "missing dtype": (_file({"w": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "lacks dtype"),
    "missing shape": (_file({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, bytes(4)), "lacks shape"),
    "missing data_offsets": (_file({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)), "lacks data_offsets"),
    "unknown dtype": (_file({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
                      "unknown dtype 'F128'"),
    "negative dimension": (_file({"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, bytes(16)),
                           "negative dimension"),
    "boolean dimension": (_file({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
                          "list of at most"),
    "offsets out of range": (_file({"w": _f32([4], 0)}, bytes(8)), "run past the 8-byte buffer"),
    "offsets reversed": (_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4)),
                         "reversed"),
    "offsets negative": (_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, bytes(4)),
                         "negative"),
    "offsets overlapping": (_file({"a": _f32([2], 0), "b": _f32([2], 4)}, bytes(12)), "overlaps"),
    "gap between tensors": (_file({"a": _f32([2], 0), "b": _f32([2], 12)}, bytes(20)), "unowned bytes"),
    "trailing bytes": (_file({"a": _f32([2], 0)}, bytes(12)), "cover 8 bytes but the safetensors buffer holds 12"),
    "size mismatch": (_file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
                      "needs 12 bytes but its data_offsets span 8"),
    "duplicate name": (_file(None, bytes(8), raw_header=json.dumps({"w": _f32([1], 0)})[:-1].encode()
                             + b', "w": ' + json.dumps(_f32([1], 4)).encode() + b"}"), "names 'w' twice"),
    "metadata not strings": (_file({"__metadata__": {"k": 1}, "w": _f32([1], 0)}, bytes(4)), "__metadata__"),
    "integer too long": (_file(None, raw_header=b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}"),
                         "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_refused_with_its_problem_named(case, tmp_path, monkeypatch):
    data, message = HOSTILE[case]
    with pytest.raises(ModelFormatError, match="^evil.safetensors") as info:
        check_safetensors(data, "evil.safetensors")
    assert message in str(info.value)
    # The header-only file check and the loader agree, and the loader never hands the file to safetensors.
    import safetensors.torch

    def parser_must_not_run(*args, **kwargs):
        raise AssertionError("safetensors parsed a file that the header check should have refused")

    monkeypatch.setattr(safetensors.torch, "load", parser_must_not_run)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(data)
    for read in (check_safetensors_file, load_safetensors):
        with pytest.raises(ModelFormatError) as info:
            read(path)
        assert message in str(info.value)


def test_a_10_gb_tensor_claim_is_refused_fast_and_without_allocating():
    # (50000, 50000) float32 = 10 GB claimed by a 200-byte file.
    data = _file({"w": {"dtype": "F32", "shape": [50000, 50000], "data_offsets": [0, 10**10]}}, bytes(64))
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match="run past"):
        check_safetensors(data, "big.safetensors")
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.05
    assert peak < 1 << 20


def test_a_10_gb_tensor_whose_offsets_fit_the_file_is_refused_by_size():
    data = _file({"w": {"dtype": "F32", "shape": [50000, 50000], "data_offsets": [0, 64]}}, bytes(64))
    with pytest.raises(ModelFormatError, match="needs 10000000000 bytes"):
        check_safetensors(data, "big.safetensors")


def test_valid_files_pass_and_load_unchanged():
    tensors = {
        "a": torch.randn(3, 4),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "half": torch.randn(5).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.randint(-128, 127, (9,), dtype=torch.int8),
    }
    data = st_save(tensors, metadata={"format": "test"})
    check_safetensors(data, "ok")
    check_safetensors(memoryview(data), "ok")
    loaded = load_safetensors_bytes(data, "ok")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_model_dir_with_a_tampered_header_is_refused(tmp_path):
    model = nnopt.create_model("simplenet", seed=0)
    path = tmp_path / "m"
    nnopt.save_model(model, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    # Point two tensors at the same bytes (same length, so every size still adds up) and re-record
    # the hash, as an attacker who edits both files would.
    names = [k for k in header if k != "__metadata__"]
    first, second = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    span = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0], header[first]["data_offsets"][0] + span]
    header[second]["shape"], header[second]["dtype"] = header[first]["shape"], header[first]["dtype"]
    body = json.dumps(header).encode()
    tampered = struct.pack("<Q", len(body)) + body + data[8 + n:]
    weights.write_bytes(tampered)
    meta = json.loads((path / "nnopt.json").read_text())
    meta["files"]["model.safetensors"]["sha256"] = hashlib.sha256(tampered).hexdigest()
    (path / "nnopt.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="overlaps|unowned"):
        nnopt.load_model(path)
