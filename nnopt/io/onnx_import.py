"""Read ONNX files safely, and quantize them with ONNX Runtime.

An ONNX file may keep tensors in "external data" files named by a relative ``location``. A hostile
model can name ``../../secret`` or ``/etc/shadow`` (or a symlink to them) and have its bytes read
into a weight. So the graph is parsed without external data first, every location is checked to
stay inside the model's own directory, and only then are the bytes read, by this module, from the
checked files. The ONNX checker runs before any ONNX Runtime session exists. onnx and onnxruntime
are the ``onnx`` extra, imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from nnopt.errors import ConfigError, ModelFormatError, NnoptError, OutputError, UnsafeFileError, UnsupportedModelError

# Bits per element of packed sub-byte types (int4, uint4, float4e2m1); others come from numpy.
_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise UnsupportedModelError("reading ONNX files needs onnx: pip install 'nnopt[onnx]'") from None
    return onnx


def load_onnx(path: str | Path) -> Any:
    """Parse ``path`` into an ``onnx.ModelProto`` with its external data inlined and checked.

    External-data locations must be relative paths without ``..`` naming regular files inside the
    model's directory (symlinks are followed and must stay inside too), with offsets and lengths
    within the file and matching the tensor's size. Then ``onnx.checker.check_model`` runs.
    Problems raise :class:`UnsafeFileError` (a location escaping the directory) or
    :class:`ModelFormatError`.
    """
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, truncated files, ...: one line naming the file
        raise ModelFormatError(f"{path} is not a valid ONNX file: {type(exc).__name__}: {exc}"[:500]) from None
    base = path.parent.resolve()
    for tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _inline_external(tensor, base, path)
    check_model(model, str(path))
    return model


def check_model(model: Any, name: str) -> None:
    """``onnx.checker.check_model`` with its failures as :class:`ModelFormatError`."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError, or ValueError for protos the checker cannot take
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(f"{name} fails the ONNX checker: {first}"[:500]) from None


def iter_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of ``model``: initializers, sparse ones, and constants in node attributes,
    in the main graph, its subgraphs and local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def confined_location(base: Path, location: str, what: str) -> Path:
    """The file that ``location`` names inside ``base``; :class:`UnsafeFileError` if it could
    point anywhere else (absolute, ``..``, a drive, or a symlink resolving outside)."""
    if not location or "\0" in location:
        raise UnsafeFileError(f"{what}: empty or malformed external-data location {location!r}")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith(("/", "\\")):
        raise UnsafeFileError(f"{what}: external-data location {location!r} is an absolute path; only files "
                              "beside the model are read")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafeFileError(f"{what}: external-data location {location!r} climbs out of the model's directory")
    base = base.resolve()
    target = (base / location).resolve()
    if target != base and base not in target.parents:
        raise UnsafeFileError(f"{what}: external-data location {location!r} resolves to {target}, outside "
                              f"the model's directory {base} (a symbolic link)")
    return target


def _inline_external(tensor: Any, base: Path, path: Path) -> None:
    """Check one external tensor's entries and replace them with its bytes (as onnx's loader would)."""
    onnx = _onnx()
    what = f"{path}: tensor {tensor.name!r}"
    entries = {entry.key: entry.value for entry in tensor.external_data}
    target = confined_location(base, entries.get("location", ""), what)
    try:
        info = target.stat()
    except OSError:
        raise ModelFormatError(f"{what}: external-data file {entries.get('location')!r} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{what}: external-data location {entries.get('location')!r} is not a regular file")
    offset = _non_negative(entries.get("offset", "0"), "offset", what)
    length = _non_negative(entries["length"], "length", what) if "length" in entries else info.st_size - offset
    if offset + length > info.st_size or length < 0:
        raise ModelFormatError(f"{what}: external data [{offset}, {offset + length}) runs past the end of the "
                               f"{info.st_size}-byte file {entries.get('location')!r}")
    expected = _tensor_bytes(tensor, onnx)
    if expected is not None and expected != length:
        raise ModelFormatError(f"{what}: its shape and type need {expected} bytes, the external data holds {length}")
    with open(target, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    if len(data) != length:
        raise ModelFormatError(f"{what}: external data was truncated while reading")
    tensor.raw_data = data
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def _non_negative(text: str, key: str, what: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise ModelFormatError(f"{what}: external-data {key} {text[:40]!r} is not a non-negative integer")
    return int(text)


def _tensor_bytes(tensor: Any, onnx: Any) -> int | None:
    """Bytes that ``tensor``'s dims and type imply; None for types without a fixed size (strings)."""
    numel = math.prod(int(d) for d in tensor.dims)
    type_name = onnx.TensorProto.DataType.Name(tensor.data_type) if tensor.data_type else ""
    if type_name in _SUB_BYTE_BITS:
        return (numel * _SUB_BYTE_BITS[type_name] + 7) // 8
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # unknown or string types: nothing to compare against
        return None
    return numel * itemsize if type_name != "STRING" else None


ONNX_WEIGHT_TYPES = ("uint8", "int8")


def quantize_onnx(src: str | Path, dst: str | Path, per_channel: bool = True, overwrite: bool = False,
                  weight_type: str = "uint8") -> Path:
    """Dynamic 8-bit quantization (ONNX Runtime's ``quantize_dynamic``) of ``src`` into ``dst``.

    ``weight_type="uint8"`` (the default) writes U8U8 MatMulInteger: ONNX Runtime widens both operands to
    16 bits before multiplying, so the file is right on every x86 CPU. ``"int8"`` (U8S8) runs faster on CPUs
    with VNNI, but ONNX Runtime's u8×s8 kernels sum pairs into saturating 16-bit lanes on CPUs without it
    (its own documentation recommends U8U8 or reduce_range there); it is refused where that kernel failed
    its known-answer check (:mod:`nnopt.io.onnx_checks`).

    ``src`` is read with :func:`load_onnx` (checked) and never modified; ``dst`` must be another
    path, and an existing ``dst`` is replaced only with ``overwrite``. The result is written to a
    temporary file beside ``dst``, checked, then renamed into place.

    >>> quantize_onnx("model.onnx", "model.int8.onnx")  # doctest: +SKIP
    """
    from nnopt.errors import ConfigError

    if weight_type not in ONNX_WEIGHT_TYPES:
        raise ConfigError(f"weight_type must be one of {', '.join(ONNX_WEIGHT_TYPES)}, got {weight_type!r}")
    src, dst = Path(src), Path(dst)
    check_onnx_output(dst, [src], overwrite)
    model = load_onnx(src)
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise UnsupportedModelError("quantizing ONNX needs onnxruntime: pip install 'nnopt[onnx]'") from None
    if weight_type == "int8":
        from nnopt.io.onnx_export import resolve_int8_weights

        # refused where ONNX Runtime's u8×s8 MatMulInteger (all quantize_dynamic writes) is wrong on this CPU
        resolve_int8_weights("int8", ("onnxruntime-u8s8",), "use weight_type='uint8' (--weight-type uint8)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}.onnx")
    try:
        with _quiet_root_logger():
            quantize_dynamic(model, tmp, per_channel=per_channel,
                             weight_type=QuantType.QUInt8 if weight_type == "uint8" else QuantType.QInt8)
        load_onnx(tmp)  # the result must itself pass the checks before it replaces anything
        os.replace(tmp, dst)
    except NnoptError:
        raise
    except Exception as exc:  # the quantizer raises many types; name the input and the cause
        raise UnsupportedModelError(
            f"ONNX Runtime could not quantize {src}: {type(exc).__name__}: {exc}"[:500]
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def check_onnx_output(dst: Path, inputs: list[Path], overwrite: bool) -> None:
    """An output ``.onnx`` file must be a new path (or an existing file with ``overwrite``), not an input."""
    from nnopt.io.atomic import refuse_input_overlap

    if dst.suffix != ".onnx":
        raise ConfigError(f"the output {dst} must end in .onnx")
    refuse_input_overlap(dst, inputs)
    if dst.is_symlink() or dst.is_dir():
        raise OutputError(f"refusing to write {dst}: it is a {'symbolic link' if dst.is_symlink() else 'directory'}")
    if dst.exists() and not overwrite:
        raise OutputError(f"refusing to overwrite {dst}: it exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # quantize_dynamic logs a "consider pre-processing" notice through the root logger on every call;
    # hide it for the call only and restore the previous setting.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def onnx_file_bytes(path: str | Path) -> int:
    """Bytes on disk of an ONNX model: the graph file plus each distinct external-data file it names."""
    onnx = _onnx()
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelFormatError(f"{path} is not a valid ONNX file: {type(exc).__name__}: {exc}"[:500]) from None
    files = set()
    for tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            files.add(confined_location(path.parent.resolve(), location, f"{path}: tensor {tensor.name!r}"))
    return path.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())
