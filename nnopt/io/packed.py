"""A compressed container for sparse and quantized weights, read back bit-exactly (Deep Compression style).

Layout (integers little-endian)::

    b"NNPK"  version:u8  flags:u8  header_len:u32  crc32:u32  header[header_len]  blobs...

``flags`` bit 0: the header is zlib-compressed. ``crc32`` covers header and blobs, so corruption is
reported instead of silently loading wrong weights. The header is compact JSON, one list per tensor
in order: ``[name, dtype, shape, nonzeros, positions, value_bits, pos_codec, pos_len, val_codec, val_len]``
(dtype a short code such as ``"f4"``; positions 0 dense, 1 bitmask, 2 relative; codecs 0 none, 1 zlib,
2 lzma (raw LZMA2), 3 bz2). Offsets are not stored: each tensor's positions blob, then its values blob,
follow the header in record order, so an offset is the running sum of lengths (smaller header, and
blobs cannot overlap).

"Zero" means an all-zero bit pattern, so -0.0 and NaN payloads are ordinary values. Positions:
dense stores none; bitmask is ``np.packbits`` of the flat mask; relative stores, per non-zero, the gap
``g`` (its flat index minus the previous one's, minus 1) as ``g // 255`` escape bytes of 255 then the
byte ``g % 255``. Values: raw element bytes (little-endian hosts), or for tensors in ``code_bits``,
b-bit two's-complement codes packed MSB-first.
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import lzma
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch

from nnopt.errors import ConfigError, ModelFormatError

MAGIC, VERSION = b"NNPK", 1
MAX_NUMEL = 2**31
MAX_HEADER = 1 << 24  # decompressed header cap: ~100k tensors' records
_PRE = struct.Struct("<4sBBII")
_DTYPES = {"f4": torch.float32, "f2": torch.float16, "bf": torch.bfloat16, "f8": torch.float64, "i1": torch.int8,
           "i2": torch.int16, "i4": torch.int32, "i8": torch.int64, "u1": torch.uint8, "b": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}
_INTS = {"i1", "i2", "i4", "i8", "u1"}
POSITIONS = ("dense", "bitmask", "relative")
CODECS = ("none", "zlib", "lzma", "bz2")
_CHUNK = 1 << 16  # elements per bit-(un)packing step (a multiple of 8): bounds the bit matrix's memory


@dataclasses.dataclass(frozen=True)
class TensorPackInfo:
    """How one tensor was stored, for size reports. ``codec`` is the values stream's."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nonzeros: int
    positions: str
    value_bits: int
    codec: str
    raw_bytes: int
    packed_bytes: int
    positions_codec: str = "none"


def _lzma_filters(size: int) -> list[dict[str, Any]]:
    """Dictionary sized to the stream: both sides derive it from the size, so it need not be stored."""
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": max(4096, min(size, 1 << 26))}]


def _compress(raw: bytes) -> tuple[int, bytes]:
    """The smallest of the four codecs' outputs for this stream; ties go to the cheaper one to read."""
    if not raw:
        return 0, b""
    outs = [raw, zlib.compress(raw, 9), lzma.compress(raw, lzma.FORMAT_RAW, filters=_lzma_filters(len(raw))),
            bz2.compress(raw, 9)]
    best = min(range(len(outs)), key=lambda i: len(outs[i]))
    return best, outs[best]


def _decompress(codec: int, blob: bytes, cap: int, what: str) -> bytes:
    """Inflate with output capped at ``cap`` (what the shapes imply), so a decompression bomb stops early."""
    if codec == 0:
        out, done = blob, True
    else:
        dec = (zlib.decompressobj() if codec == 1 else bz2.BZ2Decompressor() if codec == 3
               else lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_lzma_filters(cap)))
        try:
            out = dec.decompress(blob, cap + 1)
        except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
            raise ModelFormatError(f"{what} is a corrupt {CODECS[codec]} stream: {exc}") from None
        done = dec.eof and not dec.unused_data
    if len(out) > cap:
        raise ModelFormatError(f"{what} decompresses to more than the {cap} bytes its shape allows")
    if not done:
        raise ModelFormatError(f"{what} is a truncated {CODECS[codec]} stream or has trailing bytes")
    return out


def _pack_codes(v: np.ndarray, bits: int) -> bytes:
    """``bits``-bit codes MSB-first, so that e.g. two 4-bit codes share a byte."""
    u = v.astype(np.int64) & ((1 << bits) - 1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return b"".join(np.packbits(((u[s:s + _CHUNK, None] >> shifts) & 1).astype(np.uint8)).tobytes()
                    for s in range(0, len(u), _CHUNK))


def _unpack_codes(buf: bytes, n: int, bits: int, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`_pack_codes`: sign-extended codes, written chunk by chunk straight into ``dtype``
    (an int64 array of all ``n`` codes would be up to 32× the packed stream and 8× the tensor)."""
    arr, out = np.frombuffer(buf, np.uint8), np.empty(n, dtype)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        chunk = np.unpackbits(arr[s * bits // 8:], count=m * bits).reshape(m, bits).astype(np.int64) @ weights
        out[s:s + m] = np.where(chunk >= 1 << (bits - 1), chunk - (1 << bits), chunk)
    return out


def _relative(idx: np.ndarray) -> bytes:
    """Gaps between non-zeros as bytes, 255 escaping "add 255 and read on" (gap g: g//255 × 255, g%255)."""
    gaps = np.diff(idx, prepend=-1) - 1
    k = gaps // 255
    out = np.full(int((k + 1).sum()), 255, np.uint8)
    out[np.cumsum(k + 1) - 1] = gaps % 255
    return out.tobytes()


def _unrelative(buf: bytes, nnz: int, n: int, what: str) -> np.ndarray:
    a = np.frombuffer(buf, np.uint8)
    ends = np.flatnonzero(a != 255)
    if len(ends) != nnz or (len(a) and a[-1] == 255):
        raise ModelFormatError(f"{what} holds {len(ends)} gaps but the header declares {nnz} non-zeros")
    idx = np.cumsum(np.diff(np.cumsum(a, dtype=np.int64)[ends], prepend=0) + 1) - 1
    if nnz and idx[-1] >= n:
        raise ModelFormatError(f"{what} points past the tensor's {n} elements")
    return idx


def _frame(records: list[list[Any]], blobs: list[bytes]) -> bytes:
    """Preamble + header (zlib'd when that is smaller) + blobs."""
    head = json.dumps(records, separators=(",", ":")).encode()
    small = zlib.compress(head, 9)
    flags, head = (1, small) if len(small) < len(head) else (0, head)
    body = head + b"".join(blobs)
    return _PRE.pack(MAGIC, VERSION, flags, len(head), zlib.crc32(body)) + body


def _pack_one(name: str, t: torch.Tensor, bits: int | None) -> tuple[list[Any], list[bytes], TensorPackInfo]:
    """Try dense, bitmask and relative positions and keep whichever file bytes are fewest."""
    shape = tuple(t.shape)
    t = t.detach().cpu().contiguous().reshape(-1) if t.numel() else torch.empty(0, dtype=t.dtype)  # sane strides
    n, size = t.numel(), t.element_size()
    rows = t.view(torch.uint8).numpy().reshape(n, size)
    mask = rows.any(axis=1)
    nnz = int(mask.sum())
    encode: Callable[[np.ndarray | slice], bytes] = lambda sel: rows[sel].tobytes()  # noqa: E731
    if bits is not None:
        ints = t.to(torch.int64).numpy()
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if n and (ints.min() < lo or ints.max() > hi):
            raise ConfigError(f"tensor {name!r} has values in [{ints.min()}, {ints.max()}], outside the "
                              f"{bits}-bit code range [{lo}, {hi}]")
        if bits != 8 * size:
            encode = lambda sel: _pack_codes(ints[sel], bits)  # noqa: E731
    cands = [(0, (0, b""), _compress(encode(slice(None))))]
    if nnz < n:
        values = _compress(encode(cast(np.ndarray, mask)))  # a 1-D array: rows is 2-D
        cands += [(1, _compress(np.packbits(mask).tobytes()), values),
                  (2, _compress(_relative(np.flatnonzero(mask))), values)]
    pos, (pc, pblob), (vc, vblob) = min(cands, key=lambda c: len(c[1][1]) + len(c[2][1]))
    vbits = 8 * size if bits is None else bits
    rec = [name, _CODES[t.dtype], list(shape), nnz, pos, vbits, pc, len(pblob), vc, len(vblob)]
    info = TensorPackInfo(name, shape, str(t.dtype).removeprefix("torch."), nnz, POSITIONS[pos], vbits, CODECS[vc],
                          n * size, len(pblob) + len(vblob), CODECS[pc])
    return rec, [pblob, vblob], info



def pack_tensors(
    tensors: dict[str, torch.Tensor], code_bits: dict[str, int] | None = None
) -> tuple[bytes, list[TensorPackInfo]]:
    """Serialize ``tensors`` (in order) compactly; ``code_bits`` names integer tensors to bit-pack.

    >>> data, infos = pack_tensors({"fc.weight_q": codes}, {"fc.weight_q": 4})  # doctest: +SKIP
    """
    code_bits = dict(code_bits or {})
    for name, bits in code_bits.items():
        if name not in tensors:
            raise ConfigError(f"code_bits names {name!r}, which is not among the tensors")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ConfigError(f"code_bits[{name!r}] must be an integer in 2..16, got {bits!r}")
        if _CODES.get(tensors[name].dtype) not in _INTS:
            raise ConfigError(f"code_bits[{name!r}]: only integer tensors hold codes, not {tensors[name].dtype}")
    records, blobs, infos = [], [], []
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ConfigError(f"tensors must map str names to dense torch tensors; got {name!r}: {type(t).__name__}")
        if t.dtype not in _CODES:
            raise ConfigError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        if t.numel() > MAX_NUMEL:
            raise ConfigError(f"tensor {name!r} has {t.numel()} elements, more than the {MAX_NUMEL} supported")
        rec, pair, info = _pack_one(name, t, code_bits.get(name))
        records.append(rec)
        blobs += pair
        infos.append(info)
    return _frame(records, blobs), infos


def _check_record(i: int, r: object) -> tuple[Any, ...]:
    """Types and ranges of one header record, before anything is allocated or decompressed."""
    if not (isinstance(r, list) and len(r) == 10 and isinstance(r[0], str) and isinstance(r[1], str)
            and r[1] in _DTYPES and isinstance(r[2], list) and len(r[2]) <= 64
            and all(type(x) is int for x in [*r[2], *r[3:]])):
        raise ModelFormatError(f"header record {i} is malformed")
    name, dt, shape, nnz, pos, vbits, pc, pl, vc, vl = r
    what = f"tensor {name!r}"
    if any(d < 0 or d > MAX_NUMEL for d in shape) or (n := math.prod(shape)) > MAX_NUMEL:
        raise ModelFormatError(f"{what} declares an absurd shape {shape} (at most {MAX_NUMEL} elements)")
    size = _DTYPES[dt].itemsize
    coded = vbits != 8 * size
    if not (0 <= nnz <= n and 0 <= pos <= 2 and 0 <= pc <= 3 and 0 <= vc <= 3 and pl >= 0 and vl >= 0) or (
            coded and not (dt in _INTS and 2 <= vbits <= 16)) or (pos == 0 and pl):
        raise ModelFormatError(f"{what}: header record {i} has out-of-range fields")
    return name, _DTYPES[dt], tuple(shape), n, size, nnz, pos, vbits if coded else 0, pc, pl, vc, vl


def _unpack(data: bytes, max_bytes: int | None) -> dict[str, torch.Tensor]:
    if len(data) < _PRE.size:
        raise ModelFormatError(f"packed tensors are truncated: {len(data)} bytes, the preamble alone is {_PRE.size}")
    magic, version, flags, hlen, crc = _PRE.unpack_from(data)
    if magic != MAGIC:
        raise ModelFormatError(f"not packed tensors: magic is {magic!r}, expected {MAGIC!r}")
    if version != VERSION or flags > 1:
        raise ModelFormatError(f"packed tensors version {version} flags {flags}; this nnopt reads version {VERSION}")
    end = _PRE.size + hlen
    if end > len(data):
        raise ModelFormatError(f"header length {hlen} runs past the end of the {len(data)}-byte file")
    if zlib.crc32(memoryview(data)[_PRE.size:]) != crc:
        raise ModelFormatError("packed tensors are corrupt or truncated: checksum mismatch")
    head = data[_PRE.size:end]
    if flags & 1:
        head = _decompress(1, head, MAX_HEADER, "header")
    raw = json.loads(head.decode("utf-8"))
    if not isinstance(raw, list):
        raise ModelFormatError("header is not a list of tensor records")
    records = [_check_record(i, r) for i, r in enumerate(raw)]
    if len({r[0] for r in records}) != len(records):
        raise ModelFormatError("header names a tensor twice")
    if end + sum(r[9] + r[11] for r in records) != len(data):
        raise ModelFormatError("blob lengths in the header do not add up to the file size")
    declared = sum(r[3] * r[4] for r in records)
    if max_bytes is not None and declared > max_bytes:
        raise ModelFormatError(f"the header declares {declared} bytes of tensors, more than the {max_bytes} allowed")
    out, off = {}, end
    for name, dtype, shape, n, size, nnz, pos, bits, pc, pl, vc, vl in records:
        what = f"tensor {name!r}"
        pblob, vblob, off = data[off:off + pl], data[off + pl:off + pl + vl], off + pl + vl
        pcap = (0, -(-n // 8), nnz + (n - nnz) // 255)[pos]
        praw = _decompress(pc, pblob, pcap, f"{what} positions")
        count = n if pos == 0 else nnz
        want = -(-count * bits // 8) if bits else count * size
        vraw = _decompress(vc, vblob, want, f"{what} values")
        if len(vraw) != want:
            raise ModelFormatError(f"{what}: values are {len(vraw)} bytes, its shape and dtype imply {want}")
        sel: slice | np.ndarray = slice(None)
        if pos == 1:
            if len(praw) != pcap:
                raise ModelFormatError(f"{what}: bitmask is {len(praw)} bytes, its shape implies {pcap}")
            sel = np.unpackbits(np.frombuffer(praw, np.uint8), count=n).astype(bool)
            if int(sel.sum()) != nnz:
                raise ModelFormatError(f"{what}: bitmask marks {int(sel.sum())} non-zeros but {nnz} values are stored")
        elif pos == 2:
            sel = _unrelative(praw, nnz, n, f"{what} positions")
        if bits:
            vals = _unpack_codes(vraw, count, bits, np.dtype(str(dtype).removeprefix("torch."))).view(np.uint8)
        else:
            vals = np.frombuffer(vraw, np.uint8)
        # np.zeros is calloc: pages no value is written to stay unallocated, so a header that declares a
        # huge mostly-zero shape costs memory only where the file really holds values. Empty tensors are
        # torch-allocated, whose strides stay viewable.
        flat = torch.from_numpy(np.zeros(n * size, np.uint8)) if n else torch.zeros(0, dtype=torch.uint8)
        flat.numpy().reshape(n, size)[sel] = vals.reshape(count, size)
        out[name] = flat.view(dtype).reshape(shape)
    return out


def unpack_tensors(data: bytes, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Read :func:`pack_tensors` output back bit-exactly; any malformed input is a ModelFormatError.

    ``max_bytes`` bounds the tensors' total size (elements × element size) that the header may declare,
    checked before anything is decompressed: a caller that knows what it expects (the architecture's
    state dict, say) should pass it, because well-compressed values legitimately inflate far beyond
    the file's size.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ConfigError(f"unpack_tensors needs bytes, got {type(data).__name__}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ConfigError(f"max_bytes must be None or an integer >= 0, got {max_bytes!r}")
    try:
        return _unpack(bytes(data), max_bytes)
    except ModelFormatError:
        raise
    except Exception as exc:  # hostile input must never surface as another type
        raise ModelFormatError(f"packed tensors are corrupt: {exc!r}") from None
