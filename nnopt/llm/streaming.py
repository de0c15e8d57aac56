"""Round-to-nearest weight quantization of a Hugging Face checkpoint, streamed one tensor at a time.

:func:`quantize_checkpoint_rtn` never builds the model: it reads one tensor at a time from the safetensors
shards (plain reads into memory of its own, not the library's memory map, whose pages would count in the
resident set as long as a tensor from it lives), quantizes the 2-D ``*.weight`` tensors of
``model.layers.*`` (the q/k/v/o and gate/up/down projections of Llama-family models) and writes output
shards as it goes (:func:`save_safetensors`: each tensor straight from its memory, and each tensor that
goes out unchanged, such as the embeddings, copied from its source file in chunks, never held). Peak memory
is about one output shard of packed codes (``shard_bytes``, 256 MiB by default) plus one tensor and its
temporaries, whatever the model's size.

Quantization follows :class:`~nnopt.quantization.weights.WeightQuantConfig`: ``(S, z)`` per tensor, per
output row (``per_channel``) or per group of ``group_size`` inputs, with a partial last group where the
group size does not divide the input dimension. The stored step is ``weight_scale = 1 / S`` (float32) and
the codes are ``clamp(round(w / weight_scale) + z)``, so that ``w ≈ (q − z) · weight_scale`` is exactly
what loaders compute.

Output format: compressed-tensors ``pack-quantized`` (codes packed into int32 ``weight_packed``,
``weight_scale``, ``weight_shape``, packed ``weight_zero_point`` when asymmetric) with a
``quantization_config`` in config.json, which transformers loads (package ``compressed-tensors``; not
needed to write). compressed-tensors requires the group size to divide the input dimension, so a layer
with a partial last group is written with groups of ``gcd(group_size, in)`` that repeat its scales
(576 inputs, groups of 128: 9 groups of 64, scales in pairs, the last one alone): the same weights.
Asymmetric checkpoints load with ``CompressedTensorsConfig(dequantize=True)`` in transformers 5.25 (its
default path mis-sizes packed zero points).

Resumable: work goes to ``.NAME.nnopt-partial`` beside the output with a progress file; a run that was
killed continues from its last finished shard (same source files and config), and the directory is renamed
into place at the end.

The same writer takes codes from a calibrating algorithm instead of RTN (:class:`UnitHooks`,
:func:`write_quantized_checkpoint`; GPTQ through :mod:`nnopt.llm.layerwise`): one format code path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ConfigError, ModelFormatError, OutputError, UnsupportedModelError
from nnopt.io.atomic import atomic_write_bytes, fsync_dir
from nnopt.layers import primitives as P
from nnopt.quantization.weights import WeightQuantConfig

INDEX_FILE = "model.safetensors.index.json"
PROGRESS_FILE = "nnopt-progress.json"
FORMAT = "pack-quantized"
DEFAULT_SHARD_BYTES = 256 << 20  # output shards; peak memory ≈ this + one tensor
_PROGRESS_VERSION = 1
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# safetensors' dtype names and torch's dtypes, for the tensors read and written here without the library
_TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
        ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
        ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("C64", "complex64")) if hasattr(torch, attr)}
_DTYPE_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
# save_file's order of the tensors in a file: widest dtype first (the library's dtype order), then by name
_DTYPE_RANK = {name: rank for rank, name in enumerate(
    ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64",
     "I64", "U64"))}
_COPY_CHUNK = 16 << 20  # bytes copied at a time from a source file into an output shard
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2}
# Other weight formats a Hugging Face directory may also hold; never copied into the output.
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
# Rows quantized at once: bounds the float temporaries to a few tens of MB for any matrix.
_CHUNK_ELEMENTS = 1 << 22
# Smallest compressed-tensors group that may stand in for a partial last group (gcd(group_size, in)).
_MIN_STORED_GROUP = 16

ProgressFn = Callable[[int, int, str], None]
# int8 codes (out, in), step 1/S (float32) and zero point (int8), each (out, groups), (out, 1) or (1, 1)
Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...
    begin: int = 0  # its bytes in the file: [begin, end)
    end: int = 0


@dataclasses.dataclass(frozen=True)
class _Copied:
    """A source tensor that goes into an output shard unchanged: copied from its file in chunks when the shard
    is written, never held in memory."""

    src: Path
    tensor: _Tensor


@dataclasses.dataclass
class UnitHooks:
    """How a calibrating algorithm (GPTQ, :mod:`nnopt.llm.layerwise`) plugs into the one writer.

    ``codes(unit, tensors, chosen)`` gets a unit's tensors (one decoder layer's, by full name, each read into
    memory of its own; the dict is the hook's to keep, empty or change: the writer reads again what it
    writes) and the names chosen for quantization, and returns ``{name: (codes, step, zero)}`` in
    :func:`rtn_codes`' layout; chosen names it leaves out are quantized with RTN. A value that is a tensor
    instead replaces the source tensor of that name: a chosen weight is then quantized (RTN) or, with
    ``quantize`` false, written from it; any other tensor (a norm weight that absorbed a smoothing scale) is
    written from it in the source's dtype. ``commit(done_units)`` runs each time finished units are made
    durable, before the progress file records them, and returns the names of files it wrote into the
    partial directory that a resumed run needs (the writer keeps them and deletes the previous ones).
    ``fingerprint`` joins the resume fingerprint (the algorithm's settings and calibration data);
    ``method`` is recorded as the quantization_config's ``version``; ``flush_each_unit`` ends an output
    shard after every unit, so that a killed run resumes from its last finished layer.

    ``quantize`` false writes the chosen weights in float (their source dtype, e.g. pruned weights) and no
    quantization_config; ``input_activations`` is the compressed-tensors activation scheme recorded beside
    the weights' (W8A8: ``{"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, ...}``);
    ``config_entries`` are added to the output's config.json (e.g. a record of the sparsity).
    """

    codes: Callable[[str, dict[str, torch.Tensor], set[str]], dict[str, Codes | torch.Tensor]] | None = None
    commit: Callable[[list[str]], list[str]] | None = None
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)
    method: str = "nnopt-rtn"
    flush_each_unit: bool = False
    quantize: bool = True
    input_activations: dict[str, Any] | None = None
    config_entries: dict[str, Any] = dataclasses.field(default_factory=dict)


def partial_dir(out_dir: str | Path) -> Path:
    """Where a run writing ``out_dir`` keeps its unfinished work (``.NAME.nnopt-partial`` beside it)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.nnopt-partial"


def quantize_checkpoint_rtn(
    src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, progress: ProgressFn | None = None, *,
    include_lm_head: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Quantize a Hugging Face safetensors checkpoint (sharded or not) to ``out_dir`` with RTN.

    ``config`` chooses bits, symmetric, per_channel or group_size; its ``layers`` (names or ``re:``
    patterns of module names, e.g. ``model.layers.0.mlp.down_proj``) narrow the default selection, the
    projections of ``model.layers.*`` (plus ``lm_head`` with ``include_lm_head``). Every other tensor and
    the tokenizer/config files are copied unchanged. ``progress(done, total, unit)`` is called after each
    decoder layer (and each remaining tensor); an exception from it stops the run, which a later call
    resumes. Returns seconds, peak RSS (:func:`peak_rss_bytes`), bytes in and out and counts.
    """
    return write_quantized_checkpoint(src_dir, out_dir, config, progress, include_lm_head=include_lm_head,
                                      shard_bytes=shard_bytes)


def write_quantized_checkpoint(
    src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, progress: ProgressFn | None = None, *,
    include_lm_head: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES, hooks: UnitHooks | None = None,
) -> dict[str, Any]:
    """:func:`quantize_checkpoint_rtn` with the codes of each unit from ``hooks`` (RTN where it gives none)."""
    hooks = hooks or UnitHooks()
    start = time.perf_counter()
    src, out = Path(src_dir), Path(out_dir)
    config.validate()
    if shard_bytes < 1:
        raise ConfigError(f"shard_bytes must be positive, got {shard_bytes}")
    if any(p.startswith("type:") and p != "type:Linear" for p in config.layers):
        raise ConfigError("a checkpoint has no module types but Linear weights: use names or re: patterns")
    tensors = _read_source(src)
    source_config = _read_json(src / "config.json")
    if "quantization_config" in source_config:
        raise ModelFormatError(f"{src} is already quantized (its config.json has a quantization_config)")
    if out.exists():
        raise OutputError(f"refusing to write {out}: it exists")
    chosen = {t.name: _stored_group(t, config) for t in tensors if _selected(t, config, include_lm_head)}
    if not chosen:  # e.g. GPT-2, whose blocks are transformer.h.N (Conv1D, transposed): nothing to do is an error
        raise UnsupportedModelError(f"{src}: no weight to quantize: nnopt quantizes the 2-D projection weights of "
                                    "model.layers.N (Llama, Mistral, Qwen2/3 checkpoints) and those the layers "
                                    "selection names")
    units = _units(tensors)

    partial = partial_dir(out)
    fingerprint = {
        "version": _PROGRESS_VERSION, "source": str(src.resolve()), "files": _file_stamps(src, tensors),
        "config": config.to_dict(), "include_lm_head": include_lm_head, "shard_bytes": shard_bytes,
    }
    if hooks.fingerprint or hooks.method != "nnopt-rtn" or not hooks.quantize:
        fingerprint.update(method=hooks.method, algorithm=hooks.fingerprint, quantize=hooks.quantize)
    state = _resume_state(partial, fingerprint)
    done_units: set[str] = set(state["done_units"])
    resumed = len(done_units)
    # Output tensors of the shard being filled, and unchanged source tensors to be copied into it.
    buffer: dict[str, torch.Tensor | _Copied] = {}
    buffered_units: list[str] = []

    def flush() -> None:
        if not buffer:
            return
        file_name = f"model-{len(state['shards']) + 1:05d}.safetensors"
        tmp = partial / (file_name + ".tmp")
        save_safetensors(tmp, buffer, metadata={"format": "pt"})  # fsynced
        os.replace(tmp, partial / file_name)
        state["shards"].append({"file": file_name, "tensors": sorted(buffer)})
        state["done_units"] += buffered_units
        old_keep = set(state.get("keep", []))
        if hooks.commit is not None:
            state["keep"] = list(hooks.commit(list(state["done_units"])))
        atomic_write_bytes(partial / PROGRESS_FILE, json.dumps(state).encode())
        for stale in old_keep - set(state.get("keep", [])):
            (partial / stale).unlink(missing_ok=True)
        buffer.clear()
        buffered_units.clear()

    for k, (unit, members) in enumerate(units):
        if unit not in done_units:
            # A shard ends before a unit that would take it past shard_bytes: the buffer stays ≤ one shard.
            if buffer and _bytes(buffer) + _output_bytes(members, chosen if hooks.quantize else {},
                                                         config) > shard_bytes:
                flush()
            given: dict[str, Codes | torch.Tensor] = {}
            unit_chosen = {t.name for t in members if t.name in chosen}
            # a decoder layer with nothing chosen still goes to the hooks: a layer-by-layer algorithm carries
            # its calibration inputs through every layer
            if hooks.codes is not None and (unit_chosen or _LAYER.match(unit + ".")):
                given = hooks.codes(unit, dict(_read_unit(src, members)), unit_chosen)
            quantized = hooks.quantize
            for t in members:  # one tensor in memory at a time, and none that goes out unchanged
                name = t.name
                replacement = given.pop(name, None)
                if isinstance(replacement, torch.Tensor):
                    if tuple(replacement.shape) != t.shape:
                        raise ConfigError(f"the tensor given for {name!r} is {tuple(replacement.shape)}; the "
                                          f"source's is {t.shape}")
                    if name in chosen and quantized:
                        tensor = replacement  # quantized as it is (float32), not rounded to the source dtype
                    else:
                        tensor = replacement.to(_torch_dtype(t)).contiguous()
                    replacement = None
                elif name in chosen and quantized:
                    # given codes need only the weight's shape
                    tensor = _read_tensor(src, t) if replacement is None else torch.empty(t.shape, device="meta")
                elif replacement is not None:
                    raise ConfigError(f"codes were given for {name!r}, which is not quantized")
                else:
                    buffer[name] = _Copied(src, t)
                    continue
                if name in chosen and quantized:
                    buffer.update(_quantized_tensors(name, tensor, config, chosen[name], replacement))
                    del tensor
                    return_freed_memory()  # the source tensor and RTN's temporaries
                else:
                    buffer[name] = tensor
                    del tensor
            del given
            buffered_units.append(unit)
            if _bytes(buffer) >= shard_bytes or hooks.flush_each_unit:
                flush()
        if progress is not None:
            progress(k + 1, len(units), unit)
    flush()

    weight_map = {name: shard["file"] for shard in state["shards"] for name in shard["tensors"]}
    written = sum((partial / shard["file"]).stat().st_size for shard in state["shards"])
    index = {"metadata": {"total_size": written}, "weight_map": weight_map}
    (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    out_config = dict(source_config)
    if hooks.quantize:
        out_config["quantization_config"] = _quantization_config(config, chosen, tensors, include_lm_head,
                                                                 hooks.input_activations)
        out_config["quantization_config"]["version"] = hooks.method
    out_config.update(hooks.config_entries)
    (partial / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in ("config.json", INDEX_FILE) and not item.name.endswith(
                _SKIPPED_SUFFIXES):
            shutil.copyfile(item, partial / item.name)
    for kept in _progress_state(partial).get("keep", []):
        (partial / kept).unlink(missing_ok=True)
    (partial / PROGRESS_FILE).unlink()
    fsync_dir(partial)
    if out.exists():
        raise OutputError(f"{out} appeared while this output was being written; it was left as it is")
    os.rename(partial, out)
    fsync_dir(out.parent)
    return {
        "format": f"compressed-tensors {FORMAT}" if hooks.quantize else "safetensors",
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
        "source_bytes": sum((src / f).stat().st_size for f in {t.file for t in tensors}),
        "output_bytes": written,
        "quantized_tensors": len(chosen),
        "copied_tensors": len(tensors) - len(chosen),
        "shards": len(state["shards"]),
        "resumed_units": resumed,
        "units": len(units),
    }


def return_freed_memory() -> None:
    """Give the memory the heap holds free back to the system (glibc ``malloc_trim``; elsewhere nothing).
    Tensors of a few MiB come from the heap, and freed they stay resident beside the next step's (measured
    on the 1.1B model: 170-230 MiB after each step of a layer's calibration; RTN 949 → 617 MiB peak)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    from nnopt.runtime import _glibc as find

    libc = find()
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def _bytes(tensors: dict[str, torch.Tensor | _Copied]) -> int:
    return sum(t.tensor.end - t.tensor.begin if isinstance(t, _Copied) else t.numel() * t.element_size()
               for t in tensors.values())


def _output_bytes(members: list[_Tensor], chosen: dict[str, int | None], config: WeightQuantConfig) -> int:
    """About what a unit adds to the output: packed codes (plus ≤ 1/8 for scales) or the tensor as is."""
    total = 0
    for t in members:
        numel = math.prod(t.shape)
        total += numel * config.bits * 9 // 64 if t.name in chosen else numel * _ITEMSIZE.get(t.dtype, 4)
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory. ``ru_maxrss`` is
    not used there: it keeps the parent's peak across fork and exec (measured: a subprocess of a 3 GiB
    parent reported 3 GiB), so it overstates a child's. Elsewhere ``ru_maxrss`` (bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ------------------------------------------------------------------------------------------ source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path.parent} has no {path.name}: not a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} must hold a JSON object")
    return data


def _read_source(src: Path) -> list[_Tensor]:
    """Every tensor's name, file, shape, dtype and byte range, from the safetensors headers only (checked
    as :mod:`nnopt.io.safetensors_check` does: sizes consistent, the offsets tiling the buffer)."""
    if (src / INDEX_FILE).is_file():
        weight_map = _read_json(src / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{src / INDEX_FILE} has no weight_map")
        files = sorted({str(name) for name in weight_map.values()})
    else:
        if not (src / "model.safetensors").is_file():  # as transformers reads it: other files are not the model
            raise ModelFormatError(f"{src} holds no model.safetensors or {INDEX_FILE}")
        files = ["model.safetensors"]
    out: list[_Tensor] = []
    for file_name in files:
        path = src / file_name
        if Path(file_name).name != file_name or not path.is_file():
            raise ModelFormatError(f"{src}: shard {file_name!r} is missing or not a plain file name")
        out += _header_tensors(path, file_name)
    return out


def _header_tensors(path: Path, file_name: str) -> list[_Tensor]:
    from nnopt.io.safetensors_check import read_checked_header

    header, start = read_checked_header(path)
    return [_Tensor(name, file_name, tuple(entry["shape"]), entry["dtype"], start + entry["data_offsets"][0],
                    start + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"]


def _file_stamps(src: Path, tensors: list[_Tensor]) -> dict[str, list[int]]:
    stamps = {}
    for file_name in sorted({t.file for t in tensors} | {"config.json"}):
        st = (src / file_name).stat()
        stamps[file_name] = [st.st_size, st.st_mtime_ns]
    return stamps


def _units(tensors: list[_Tensor]) -> list[tuple[str, list[_Tensor]]]:
    """Tensors grouped by decoder layer, in layer order, then each other tensor alone (embeddings, final
    norm, head: a unit each, so that a 7B model's two 262 MB tables are never buffered together)."""
    layers: dict[int, list[_Tensor]] = {}
    rest: list[_Tensor] = []
    for t in tensors:
        match = _LAYER.match(t.name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(t)
        else:
            rest.append(t)
    units = [(f"model.layers.{n}", layers[n]) for n in sorted(layers)]
    return units + [(t.name, [t]) for t in rest]


def _read_unit(src: Path, members: list[_Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """One unit's tensors, each read into memory of its own (:func:`_read_tensor`)."""
    for t in members:
        yield t.name, _read_tensor(src, t)


def _torch_dtype(t: _Tensor) -> torch.dtype:
    dtype = _TORCH_DTYPES.get(t.dtype)
    if dtype is None:
        raise ModelFormatError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype}, which this torch cannot hold")
    return dtype


def _read_tensor(src: Path, t: _Tensor) -> torch.Tensor:
    """One tensor, read with plain reads into memory of its own. Not through safetensors' memory map: the
    pages a map touches count in the resident set as long as any tensor from it lives (a 262 MB embedding
    read then copied counted twice), and they are read once more when the writer copies or requantizes."""
    buffer = torch.empty(t.end - t.begin, dtype=torch.uint8)
    _read_range(src / t.file, t.begin, buffer.numpy().data, t.name)
    return buffer.view(_torch_dtype(t)).reshape(t.shape)


def read_rows(src: Path, t: _Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (sorted, unique int64) of a 2-D source tensor, in its dtype, reading those rows only
    (the calibration windows' embeddings without the whole table)."""
    row_bytes = (t.end - t.begin) // max(t.shape[0], 1)
    out = torch.empty(len(rows), row_bytes, dtype=torch.uint8)
    view = out.numpy().data.cast("B")
    ids = rows.tolist()
    path = src / t.file
    try:
        with open(path, "rb", buffering=0) as fh:
            k = 0
            while k < len(ids):  # runs of consecutive rows in one read
                end = k + 1
                while end < len(ids) and ids[end] == ids[end - 1] + 1:
                    end += 1
                _read_into(fh, t.begin + ids[k] * row_bytes, view[k * row_bytes:end * row_bytes], path, t.name)
                k = end
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    return out.view(_torch_dtype(t)).reshape(len(ids), *t.shape[1:])


def _read_range(path: Path, offset: int, into: memoryview, name: str) -> None:
    try:
        with open(path, "rb", buffering=0) as fh:
            _read_into(fh, offset, into, path, name)
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_into(fh: Any, offset: int, into: memoryview, path: Path, name: str) -> None:
    fh.seek(offset)
    done = 0
    while done < into.nbytes:
        got = fh.readinto(into[done:])
        if not got:
            raise ModelFormatError(f"cannot read {path}: it ends inside tensor {name!r}")
        done += got


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor | _Copied],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file as ``safetensors.torch.save_file`` lays it out (tensors by dtype width, then
    name; header padded to 8 bytes), each tensor written straight from its memory and each :class:`_Copied`
    one copied from its source file in chunks, then fsync it: nothing of the file is assembled in memory."""
    entries: list[tuple[str, str, tuple[int, ...], int, torch.Tensor | _Copied]] = []
    for name, value in tensors.items():
        if isinstance(value, _Copied):
            t = value.tensor
            entries.append((name, t.dtype, t.shape, t.end - t.begin, value))
        else:
            dtype = _DTYPE_NAMES.get(value.dtype)
            if dtype is None:
                raise OutputError(f"cannot write {name!r}: safetensors has no dtype for {value.dtype}")
            value = value.detach().contiguous()
            entries.append((name, dtype, tuple(value.shape), value.numel() * value.element_size(), value))
    entries.sort(key=lambda e: (-_DTYPE_RANK.get(e[1], -1), e[0]))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, _, _, nbytes, value in entries:
            if not nbytes:
                continue
            if isinstance(value, _Copied):
                _copy_range(value.src / value.tensor.file, value.tensor.begin, nbytes, fh, value.tensor.name)
            else:
                fh.write(value.reshape(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())


def _copy_range(path: Path, offset: int, nbytes: int, out: Any, name: str) -> None:
    chunk = bytearray(min(nbytes, _COPY_CHUNK))
    view = memoryview(chunk)
    try:
        with open(path, "rb", buffering=0) as fh:
            while nbytes:
                size = min(nbytes, len(chunk))
                _read_into(fh, offset, view[:size], path, name)
                out.write(view[:size])
                offset += size
                nbytes -= size
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------------------ selection


def _module_of(name: str) -> str:
    return name[: -len(".weight")]


def _selected(t: _Tensor, config: WeightQuantConfig, include_lm_head: bool) -> bool:
    if len(t.shape) != 2 or not t.name.endswith(".weight") or t.dtype not in _FLOAT_DTYPES:
        return False
    module = _module_of(t.name)
    default = bool(_LAYER.match(t.name)) or (include_lm_head and module == "lm_head")
    if not config.layers:
        return default
    for pattern in config.layers:
        if pattern == "type:Linear":
            return default or module == "lm_head"
        if pattern.startswith("re:") and re.search(pattern[3:], module) or pattern == module:
            return True
    return False


def _stored_group(t: _Tensor, config: WeightQuantConfig) -> int | None:
    """The compressed-tensors group size for this weight: the config's, or gcd(group_size, in) standing in
    for a partial last group; refuses a group wider than the input or one that would store tiny groups."""
    if config.group_size is None:
        return None
    out_f, in_f = t.shape
    if config.group_size > in_f:
        raise ConfigError(f"WeightQuantConfig.group_size: {config.group_size} exceeds the input dimension {in_f} "
                          f"of {_module_of(t.name)!r}")
    if in_f % config.group_size == 0:
        return config.group_size
    stored = math.gcd(config.group_size, in_f)
    if stored < min(_MIN_STORED_GROUP, config.group_size):
        raise ConfigError(f"WeightQuantConfig.group_size: {config.group_size} leaves a partial last group in the "
                          f"input dimension {in_f} of {_module_of(t.name)!r} that compressed-tensors can store "
                          f"only as groups of {stored}; choose a group size sharing a factor of ≥ "
                          f"{_MIN_STORED_GROUP} with {in_f}")
    return stored


# ------------------------------------------------------------------------------------------ quantization


def rtn_codes(weight: torch.Tensor, config: WeightQuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN of one (out, in) matrix: int8 codes (out, in), step ``1/S`` float32 and zero point int8, each
    (out, groups) for groups (the last one partial where ``group_size`` does not divide ``in``), (out, 1)
    per channel or (1, 1) per tensor; ``w ≈ (codes − z) · step``. Row blocks bound the temporaries."""
    out_f, in_f = weight.shape
    bits, symmetric = config.bits, config.symmetric
    qmin, qmax = P.qrange(bits, symmetric)
    group = config.group_size
    per_tensor = group is None and not config.per_channel
    if per_tensor:
        scale, zero = P.qparams_from_range(weight.min().float(), weight.max().float(), bits, symmetric)
        step_all, zero_all = _step(scale).reshape(1, 1), zero.reshape(1, 1)
    n_cols = 1 if group is None else P.group_count(in_f, group)
    codes = torch.empty(out_f, in_f, dtype=torch.int8)
    steps = torch.empty(out_f, n_cols, dtype=torch.float32)
    zeros = torch.empty(out_f, n_cols, dtype=torch.int32)
    rows = max(1, _CHUNK_ELEMENTS // max(in_f, 1))
    for r0 in range(0, out_f, rows):
        block = weight[r0:r0 + rows].float()
        if per_tensor:
            step, zero = step_all.expand(block.shape[0], 1), zero_all.expand(block.shape[0], 1)
        elif group is None:
            scale, zero = P.compute_qparams(block, bits, symmetric, channel_axis=0)  # (rows, 1)
            step = _step(scale)
        else:
            scale, zero = P.compute_group_qparams(block, bits, symmetric, group)  # (rows, groups, 1)
            step, zero = _step(scale).squeeze(-1), zero.squeeze(-1)
        steps[r0:r0 + rows], zeros[r0:r0 + rows] = step, zero
        width = in_f if group is None else group
        step_full = step.repeat_interleave(width, dim=1)[:, :in_f]
        zero_full = zero.repeat_interleave(width, dim=1)[:, :in_f]
        q = torch.round(block / step_full).add_(zero_full).clamp_(qmin, qmax)
        codes[r0:r0 + rows] = q.to(torch.int8)
    if per_tensor:
        return codes, step_all, zero_all.to(torch.int8)
    return codes, steps, zeros.to(torch.int8)


def _step(scale: torch.Tensor) -> torch.Tensor:
    """The stored step ``1/S`` in float32 (computed in float64, rounded once)."""
    return (1.0 / scale.double()).float()


def dequantize_rtn(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Float32 ``(codes − z) · step`` for :func:`rtn_codes`' outputs."""
    in_f = codes.shape[1]
    width = in_f if group_size is None or step.shape[1] == 1 else group_size
    step_full = step.repeat_interleave(width, dim=1)[:, :in_f] if step.shape[1] > 1 else step
    zero_full = zero.repeat_interleave(width, dim=1)[:, :in_f] if zero.shape[1] > 1 else zero
    return (codes.float() - zero_full.float()) * step_full


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense int32 packing of signed ``bits``-bit codes along the last dimension
    (stored unsigned, code + 2^(bits−1); element i at bit ``bits·i``). 4 and 8 bits on little-endian hosts
    are plain byte operations; other widths use compressed-tensors' own packer."""
    rows, cols = codes.shape
    if sys.byteorder == "little" and bits in (4, 8):
        unsigned = (codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        per_word = 32 // bits
        pad = -cols % per_word
        if pad:
            unsigned = torch.nn.functional.pad(unsigned, (0, pad))
        if bits == 4:
            unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
        return unsigned.contiguous().view(torch.int32)
    import importlib

    helpers = importlib.import_module("compressed_tensors.compressors.pack_quantized.helpers")  # untyped package
    packed: torch.Tensor = helpers.pack_to_int32(codes.to(torch.int8).contiguous(), bits)
    return packed


def _quantized_tensors(
    name: str, weight: torch.Tensor, config: WeightQuantConfig, stored_group: int | None,
    given: Codes | None = None,
) -> dict[str, torch.Tensor]:
    codes, step, zero = rtn_codes(weight, config) if given is None else _checked_codes(name, weight, config, given)
    if config.group_size is not None and stored_group != config.group_size:
        # Partial last group: groups of stored_group, each carrying the scale of the group it lies in.
        assert stored_group is not None
        index = torch.arange(weight.shape[1] // stored_group) * stored_group // config.group_size
        step, zero = step[:, index], zero[:, index]
    base = _module_of(name)
    out = {
        f"{base}.weight_packed": pack_int32(codes, config.bits),
        f"{base}.weight_scale": (step.reshape(1) if step.shape == (1, 1) else step).contiguous(),
        f"{base}.weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }
    if not config.symmetric:
        if config.group_size is None and not config.per_channel:
            out[f"{base}.weight_zero_point"] = zero.reshape(1).contiguous()
        else:  # packed along the output dimension, as compressed-tensors does
            out[f"{base}.weight_zero_point"] = pack_int32(zero.t().contiguous(), config.bits).t().contiguous()
    return out


def _checked_codes(name: str, weight: torch.Tensor, config: WeightQuantConfig,
                   given: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """An algorithm's codes, refused unless they have exactly :func:`rtn_codes`' layout for this weight."""
    codes, step, zero = given
    out_f, in_f = weight.shape
    cols = 1 if config.group_size is None else P.group_count(in_f, config.group_size)
    rows = 1 if config.group_size is None and not config.per_channel else out_f
    qmin, qmax = P.qrange(config.bits, config.symmetric)
    if (codes.shape != (out_f, in_f) or codes.dtype != torch.int8 or step.shape != (rows, cols)
            or zero.shape != (rows, cols) or step.dtype != torch.float32 or zero.dtype != torch.int8):
        raise ConfigError(f"codes for {name!r} do not have the stored layout: codes {tuple(codes.shape)} "
                          f"{codes.dtype}, step {tuple(step.shape)} {step.dtype}, zero {tuple(zero.shape)} "
                          f"{zero.dtype}; expected ({out_f}, {in_f}) int8 and ({rows}, {cols}) float32/int8")
    if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise ConfigError(f"codes for {name!r} leave the {config.bits}-bit range [{qmin}, {qmax}]")
    return codes, step, zero


def _quantization_config(
    config: WeightQuantConfig, chosen: dict[str, int | None], tensors: list[_Tensor], include_lm_head: bool,
    input_activations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json's ``quantization_config``: one compressed-tensors group per stored group size."""
    strategy = "group" if config.group_size is not None else "channel" if config.per_channel else "tensor"
    by_group: dict[int | None, list[str]] = {}
    for name, stored in chosen.items():
        by_group.setdefault(stored, []).append(_module_of(name))
    all_modules = {_module_of(t.name) for t in tensors if len(t.shape) == 2 and t.name.endswith(".weight")}
    groups = {}
    for k, (stored, modules) in enumerate(sorted(by_group.items(), key=lambda kv: -(kv[0] or 0))):
        groups[f"group_{k}"] = {
            "targets": _targets(modules, all_modules),
            "weights": {"num_bits": config.bits, "type": "int", "symmetric": config.symmetric,
                        "strategy": strategy, "group_size": stored, "dynamic": False, "observer": "minmax"},
            "input_activations": input_activations, "output_activations": None, "format": FORMAT,
        }
    ignored = sorted(m for m in all_modules if f"{m}.weight" not in chosen and m == "lm_head")
    return {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignored, "kv_cache_scheme": None,
        "version": "nnopt-rtn",
    }


def _targets(modules: list[str], all_modules: set[str]) -> list[str]:
    """``re:`` targets for these modules: one per projection kind (layer index wildcarded) where that
    pattern picks exactly these modules, else one per module."""
    targets: list[str] = []
    chosen = set(modules)
    kinds: dict[str, list[str]] = {}
    for m in sorted(chosen):
        kinds.setdefault(_LAYER.sub("model.layers.#.", m), []).append(m)
    for kind, members in sorted(kinds.items()):
        pattern = "^" + re.escape(kind).replace("\\#", "#").replace("#", r"\d+") + "$"
        hits = {m for m in all_modules if re.match(pattern, m)}
        if hits == set(members):
            targets.append("re:" + pattern)
        else:
            targets += ["re:^" + re.escape(m) + "$" for m in members]
    return targets


# ------------------------------------------------------------------------------------------ resume


def _progress_state(partial: Path) -> dict[str, Any]:
    try:
        state = json.loads((partial / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _resume_state(partial: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Progress of an earlier, interrupted run with the same inputs, else a fresh partial directory."""
    fresh = {"fingerprint": fingerprint, "done_units": [], "shards": []}
    progress_file = partial / PROGRESS_FILE
    if partial.is_dir() and progress_file.is_file():
        try:
            state = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and state.get("fingerprint") == fingerprint and all(
            (partial / shard["file"]).is_file() for shard in state.get("shards", [])
        ) and all((partial / name).is_file() for name in state.get("keep", [])):
            recorded = {shard["file"] for shard in state["shards"]} | {PROGRESS_FILE} | set(state.get("keep", []))
            for item in partial.iterdir():  # a shard that was being written when the run stopped
                if item.name not in recorded:
                    item.unlink()
            return state
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    atomic_write_bytes(progress_file, json.dumps(fresh).encode())
    return fresh
