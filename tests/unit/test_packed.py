import bz2
import json
import lzma
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnopt.errors import ConfigError, ModelFormatError
from nnopt.io.packed import _PRE, _frame, _lzma_filters, pack_tensors, unpack_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool]
INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _assert_same(expected: dict, actual: dict) -> None:
    assert list(actual) == list(expected)
    for name, t in expected.items():
        got = actual[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(_bits(got), _bits(t)), name


def _random(rng: np.random.Generator, dtype: torch.dtype, shape: tuple, sparsity: float) -> torch.Tensor:
    """Random bit patterns (NaN payloads, infs, -0.0 included), with a fraction set to all-zero bits."""
    n, size = int(np.prod(shape)), dtype.itemsize
    rows = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if dtype == torch.bool:
        rows &= 1
    if dtype.is_floating_point and n:
        rows[rng.random(n) < 0.1] = _bits(torch.tensor(-0.0, dtype=dtype)).numpy()
    rows[rng.random(n) < sparsity] = 0
    flat = torch.zeros(n * size, dtype=torch.uint8)
    flat.numpy()[:] = rows.reshape(-1)
    return flat.view(dtype).reshape(shape)


def _sparse_codes(shape: tuple, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    return torch.where(torch.rand(shape, generator=g) < density, codes, torch.zeros((), dtype=torch.int8))


def _header(data: bytes) -> list:
    _, _, flags, hlen, _ = _PRE.unpack_from(data)
    head = data[_PRE.size:_PRE.size + hlen]
    return json.loads(zlib.decompress(head) if flags & 1 else head)


def _rejects(data: bytes, match: str | None = None) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=match):
        unpack_tensors(data)
    assert time.perf_counter() - start < 1.0


# 1. Bit-exact round trips.

@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 9), max_size=3).map(tuple),
       sparsity=st.sampled_from([0.0, 0.5, 0.95, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_bit_exact(dtype, shape, sparsity, seed):
    rng = np.random.default_rng(seed)
    tensors = {"t": _random(rng, dtype, shape, sparsity), "scalar": _random(rng, dtype, (), sparsity)}
    data, infos = pack_tensors(tensors)
    _assert_same(tensors, unpack_tensors(data))
    assert [i.name for i in infos] == ["t", "scalar"] and infos[0].shape == shape
    assert infos[0].nonzeros == int(_bits(tensors["t"]).reshape(-1, dtype.itemsize).any(1).sum())


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(INTS), bits=st.integers(2, 16), n=st.integers(0, 300),
       sparsity=st.sampled_from([0.0, 0.5, 0.95, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_code_bits_round_trip(dtype, bits, n, sparsity, seed):
    rng = np.random.default_rng(seed)
    info = torch.iinfo(dtype)
    lo, hi = max(-(2 ** (bits - 1)), info.min), min(2 ** (bits - 1) - 1, info.max)
    values = rng.integers(lo, hi + 1, n) * (rng.random(n) >= sparsity)
    tensors = {"q": torch.from_numpy(values).to(dtype)}
    data, infos = pack_tensors(tensors, {"q": bits})
    _assert_same(tensors, unpack_tensors(data))
    assert infos[0].value_bits == bits


def test_all_dtypes_special_values_and_order():
    tensors = {
        "neg_zero": torch.tensor([0.0, -0.0, 1.0, -0.0]),
        "nan_payload": torch.from_numpy(np.array([0x7FC01234, 0, 0xFFC00001], np.uint32).view(np.float32)),
        "scalar_zero": torch.tensor(0.0, dtype=torch.float64),
        "scalar_neg_zero": torch.tensor(-0.0, dtype=torch.bfloat16),
        "empty": torch.empty(0, 5, dtype=torch.float16),
        "empty_1d": torch.empty(0, dtype=torch.int64),
        "bools": torch.tensor([True, False, True]),
        "noncontig": torch.arange(12, dtype=torch.int16).reshape(3, 4).t(),
    }
    out = unpack_tensors(pack_tensors(tensors)[0])
    _assert_same(tensors, out)
    assert torch.equal(_bits(out["neg_zero"]), _bits(tensors["neg_zero"]))


# 2. code_bits packing.

def test_code_bits_halve_the_values_stream():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (4000,), generator=g, dtype=torch.int8)
    codes[codes == 0] = 1  # all non-zero: dense, so the one blob is the values stream
    data, infos = pack_tensors({"fc.weight_q": codes}, {"fc.weight_q": 4})
    _assert_same({"fc.weight_q": codes}, unpack_tensors(data))
    (rec,) = _header(data)
    assert infos[0].positions == "dense" and infos[0].value_bits == 4 and rec[5] == 4
    assert abs(rec[9] - codes.numel() / 2) <= 0.02 * codes.numel()
    assert pack_tensors({"fc.weight_q": codes})[1][0].value_bits == 8


@pytest.mark.parametrize("bad", [8, -9, 100])
def test_code_out_of_range_is_config_error(bad):
    codes = torch.zeros(10, dtype=torch.int8)
    codes[3] = bad
    with pytest.raises(ConfigError, match="fc.weight_q"):
        pack_tensors({"fc.weight_q": codes}, {"fc.weight_q": 4})


@pytest.mark.parametrize("code_bits", [{"w": 1}, {"w": 17}, {"w": True}, {"w": 4.0}, {"missing": 4}, {"f": 4}])
def test_bad_code_bits_are_config_errors(code_bits):
    with pytest.raises(ConfigError):
        pack_tensors({"w": torch.zeros(4, dtype=torch.int8), "f": torch.zeros(4)}, code_bits)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError):
        pack_tensors({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ConfigError):
        pack_tensors({"l": [1, 2]})
    with pytest.raises(ConfigError):
        unpack_tensors("NNPK")


# 3. Position encoding choice and sizes.

def test_sparse_chooses_positions_and_dense_chooses_dense():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 100, generator=g)
    sparse = torch.where(torch.rand(300, 100, generator=g) < 0.05, w, torch.zeros(()))
    _, infos = pack_tensors({"sparse": sparse, "dense": w})
    assert infos[0].positions in ("relative", "bitmask") and infos[1].positions == "dense"
    assert infos[0].packed_bytes < 0.2 * infos[0].raw_bytes


def test_sparse_4bit_file_is_under_a_tenth_of_fp32():
    codes = _sparse_codes((300, 100), 0.05)
    data, infos = pack_tensors({"w": codes}, {"w": 4})
    assert len(data) < 0.1 * 300 * 100 * 4
    assert infos[0].positions in ("relative", "bitmask")
    _assert_same({"w": codes}, unpack_tensors(data))


# 4. Hostile inputs.

@pytest.fixture(scope="module")
def valid() -> bytes:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 40, generator=g) * (torch.rand(40, 40, generator=g) < 0.3)
    tensors = {"w": _sparse_codes((60, 50), 0.05), "b": torch.randn(7, generator=g), "m": m}
    return pack_tensors(tensors, {"w": 4})[0]


def test_truncation_and_magic(valid):
    for cut in (0, 3, 4, 5, 9, 13, _PRE.size, _PRE.size + 5, len(valid) // 2, len(valid) - 1):
        _rejects(valid[:cut])
    _rejects(b"XNPK" + valid[4:], "magic")
    _rejects(valid[:4] + bytes([9]) + valid[5:], "version")
    _rejects(valid + b"\0", "checksum")


def test_bogus_header_lengths(valid):
    _, version, flags, _, crc = _PRE.unpack_from(valid)
    body = valid[_PRE.size:]
    _rejects(_PRE.pack(b"NNPK", version, flags, 2**32 - 1, crc) + body, "header length")
    for hlen in (0, 1, 10):
        _rejects(_PRE.pack(b"NNPK", version, flags, hlen, crc) + body)


def test_crafted_headers():
    f4 = [4 * b"\1"]
    cases = [
        ([["x", "f4", [2**20, 2**20], 0, 0, 32, 0, 0, 0, 0]], [], "absurd shape"),
        ([["x", "f4", [-1, 4], 0, 0, 32, 0, 0, 0, 0]], [], "absurd shape"),
        ([["x", "f4", [2**62, 0], 0, 0, 32, 0, 0, 0, 0]], [], "absurd shape"),
        ([["x", "f4", [3], 3, 0, 32, 0, 0, 0, 8]], [b"", 8 * b"\1"], "imply 12"),
        ([["x", "f4", [3], 3, 0, 32, 0, 0, 0, 16]], [b"", 16 * b"\1"], "more than"),
        ([["x", "f4", [16], 1, 1, 32, 0, 2, 0, 4]], [b"\xff\x00"] + f4, "bitmask marks 8"),
        ([["x", "f4", [16], 1, 1, 32, 0, 1, 0, 4]], [b"\x80"] + f4, "bitmask is 1 bytes"),
        ([["x", "f4", [16], 1, 2, 32, 0, 1, 0, 4]], [b"\x10"] + f4, "points past"),
        ([["x", "f4", [16], 2, 2, 32, 0, 2, 0, 8]], [b"\x01\xff"] + f4 * 2, "holds 1 gaps"),
        ([["x", "f4", [4], 1, 0, 32, 0, 0, 0, 4]], [b"", 16 * b"\1"], "do not add up"),
        ([["x", "f4", [4], 1, 0, 32, 0, 0, 0, 99]], [b"", 16 * b"\1"], "do not add up"),
        ([["x", "f4", [1], 1, 0, 32, 0, 0, 0, 4]] * 2, [b"", b"\1" * 4] * 2, "twice"),
        ([["x", "f4", [1], 1, 0, 4, 0, 0, 0, 1]], [b"", b"\1"], "out-of-range"),
        ([["x", "i1", [1], 1, 0, 1, 0, 0, 0, 1]], [b"", b"\1"], "out-of-range"),
        ([["x", "f4", [1], True, 0, 32, 0, 0, 0, 4]], [b"", b"\1" * 4], "malformed"),
        ([["x", "f9", [1], 1, 0, 32, 0, 0, 0, 4]], [b"", b"\1" * 4], "malformed"),
        ({"x": 1}, [], "not a list"),
    ]
    for records, blobs, match in cases:
        _rejects(_frame(records, blobs), match)
    head = b"{not json"
    _rejects(_PRE.pack(b"NNPK", 1, 0, len(head), zlib.crc32(head)) + head)


def test_decompression_bombs_stop_at_the_declared_size():
    zeros = bytes(2_000_000)
    bombs = [(1, zlib.compress(zeros, 9)), (3, bz2.compress(zeros, 9)),
             (2, lzma.compress(zeros, lzma.FORMAT_RAW, filters=_lzma_filters(16)))]
    for codec, blob in bombs:
        _rejects(_frame([["x", "f4", [4], 4, 0, 32, 0, 0, codec, len(blob)]], [b"", blob]), "more than")
    head = zlib.compress(b" " * 20_000_000)
    _rejects(_PRE.pack(b"NNPK", 1, 1, len(head), zlib.crc32(head)) + head, "header decompresses")


def test_fuzzed_files_load_or_raise_model_format_error(valid):
    rng = np.random.default_rng(1)
    start, loaded = time.perf_counter(), 0
    for i in range(300):
        data = bytearray(valid)
        kind = rng.integers(3)
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] = rng.integers(256)
        elif kind == 1:
            at = rng.integers(len(data))
            del data[at:at + rng.integers(1, 20)]
        else:
            data[rng.integers(len(data)):rng.integers(len(data))] = rng.bytes(rng.integers(1, 8))
        if i % 2:  # fix the checksum so that the parser and decoders behind it see the damage
            data[10:14] = zlib.crc32(bytes(data[_PRE.size:])).to_bytes(4, "little")
        try:
            unpack_tensors(bytes(data))
            loaded += 1
        except ModelFormatError:
            pass
    assert time.perf_counter() - start < 5.0
