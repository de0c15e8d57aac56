"""Validate a safetensors header before any parser sees the file.

Layout: ``u64 little-endian N``, then ``N`` bytes of UTF-8 JSON (an object mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}``, plus an optional ``"__metadata__"`` of
strings), then the byte buffer that the offsets index. The checks here look only at the header and
the buffer's length, so a hostile header (a 10 GB tensor, overlapping or reversed offsets, an
absurd header length) is refused in microseconds and before anything large is allocated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ModelFormatError

# The safetensors library's own cap on the header, so that no file it accepts is refused here.
MAX_HEADER_BYTES = 100_000_000
MAX_RANK = 64
# Bytes per element of each dtype that torch can load (sub-byte float formats are not accepted).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def check_safetensors(data: bytes | memoryview, name: str) -> None:
    """Raise :class:`ModelFormatError` (naming ``name`` and the problem) unless ``data`` is a
    well-formed safetensors file: sizes consistent, every byte of the buffer owned by exactly one
    tensor, in order."""
    view = memoryview(data)
    if view.nbytes < 8:
        raise ModelFormatError(f"{name} is not a safetensors file: {view.nbytes} bytes, the length prefix alone is 8")
    header_len = int.from_bytes(view[:8], "little")
    _check_header_len(header_len, view.nbytes, name)
    header = _parse_header(bytes(view[8:8 + header_len]), name)
    check_header(header, view.nbytes - 8 - header_len, name)


def check_safetensors_file(path: str | Path) -> None:
    """:func:`check_safetensors` on a file, reading only its header (the buffer length comes from
    the file's size)."""
    read_checked_header(path)


def read_checked_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header, checked as :func:`check_safetensors` checks it (the buffer length from
    the file's size), and the file offset where its data buffer starts; only the header is read."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ModelFormatError(f"{path} is not a safetensors file: {size} bytes, the length prefix alone is 8")
            header_len = int.from_bytes(prefix, "little")
            _check_header_len(header_len, size, str(path))
            raw = fh.read(header_len)
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    header = _parse_header(raw, str(path))
    check_header(header, size - 8 - header_len, str(path))
    return header, 8 + header_len


def _check_header_len(header_len: int, file_bytes: int, name: str) -> None:
    if header_len > MAX_HEADER_BYTES:
        raise ModelFormatError(
            f"{name}: safetensors header claims {header_len} bytes, more than the {MAX_HEADER_BYTES} allowed"
        )
    if header_len > file_bytes - 8:
        raise ModelFormatError(
            f"{name}: safetensors header claims {header_len} bytes but only {file_bytes - 8} follow the prefix"
        )


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, check it, then parse it: the checked bytes are the ones loaded."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return load_safetensors_bytes(data, str(path))


def load_safetensors_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Check, then parse with safetensors; any parser error becomes a :class:`ModelFormatError`."""
    check_safetensors(data, name)
    from safetensors.torch import load as st_load

    try:
        return st_load(bytes(data))
    except Exception as exc:  # the parser's own error types vary by version; name the file
        raise ModelFormatError(f"{name} is not a valid safetensors file: {exc}") from None


def _parse_header(raw: bytes, name: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise ModelFormatError(f"{name}: safetensors header is not UTF-8") from None
    except _Duplicate as exc:
        raise ModelFormatError(f"{name}: safetensors header names {exc.args[0]!r} twice") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too-long integers, deep nesting
        raise ModelFormatError(f"{name}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{name}: safetensors header is a JSON {type(header).__name__}, not an object")
    return header


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def check_header(header: dict[str, Any], buffer_bytes: int, name: str) -> None:
    """Entries complete and typed, sizes consistent, and the offsets tile ``[0, buffer_bytes)``
    exactly: sorted by start, each begins where the previous ended (no gap, no overlap)."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ModelFormatError(f"{name}: safetensors __metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        begin, end = _check_entry(tensor, entry, buffer_bytes, name)
        spans.append((begin, end, tensor))
    spans.sort()
    cursor, previous = 0, None
    for begin, end, tensor in spans:
        if begin < cursor:
            raise ModelFormatError(f"{name}: tensor {tensor!r} overlaps {previous!r} in the safetensors buffer")
        if begin > cursor:
            raise ModelFormatError(
                f"{name}: {begin - cursor} unowned bytes before tensor {tensor!r} in the safetensors buffer"
            )
        cursor, previous = end, tensor
    if cursor != buffer_bytes:
        raise ModelFormatError(
            f"{name}: the tensors cover {cursor} bytes but the safetensors buffer holds {buffer_bytes}"
        )


def _check_entry(tensor: str, entry: Any, buffer_bytes: int, name: str) -> tuple[int, int]:
    where = f"{name}: tensor {tensor!r}"
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{where}: header entry is not an object")
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        raise ModelFormatError(f"{where}: header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ModelFormatError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) for d in shape):
        raise ModelFormatError(f"{where}: shape must be a list of at most {MAX_RANK} integers, got {shape!r}"[:300])
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{where}: shape {shape} has a negative dimension")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ModelFormatError(f"{where}: data_offsets must be two integers, got {offsets!r}"[:300])
    begin, end = offsets
    if begin < 0 or end < 0:
        raise ModelFormatError(f"{where}: data_offsets {offsets} are negative")
    if end < begin:
        raise ModelFormatError(f"{where}: data_offsets {offsets} are reversed")
    if end > buffer_bytes:
        raise ModelFormatError(
            f"{where}: data_offsets {offsets} run past the {buffer_bytes}-byte buffer"
        )
    want = DTYPE_BYTES[dtype] * math.prod(shape)
    if want != end - begin:
        raise ModelFormatError(
            f"{where}: {dtype} {shape} needs {want} bytes but its data_offsets span {end - begin}"
        )
    return begin, end


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
