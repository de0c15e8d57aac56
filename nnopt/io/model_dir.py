"""nnopt model directories: ``model.safetensors`` (weights) + ``nnopt.json`` (everything else).

``nnopt.json`` records the architecture and its config, the passes applied with their settings,
metrics, library versions, and the sha256 and size of each file. Loading rebuilds the model
from that record and reads tensors with safetensors: nothing stored is ever executed.

Any ``nn.Module`` saves: one nnopt did not create is recorded as a user module (its class's import
path, as data; see :mod:`nnopt.models.user_module`), after a check that this record rebuilds it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt._version import __version__
from nnopt.envinfo import library_versions
from nnopt.errors import ConfigError, ModelFormatError
from nnopt.io.atomic import atomic_directory, refuse_input_overlap, write_bytes_durable
from nnopt.io.json_file import read_json_document
from nnopt.io.safety import refuse_unsafe
from nnopt.lineage import USER_MODULE, AppliedPass, Lineage, get_lineage, has_lineage, user_module_lineage

WEIGHTS_FILE = "model.safetensors"
PACKED_FILE = "model.nnpk"
META_FILE = "nnopt.json"
# Weight formats: "safetensors" (standard, dense) or "packed" (sparse positions, bit-packed codes,
# entropy coded; see nnopt.io.packed). Exactly one weights file per model directory.
WEIGHT_FILES = {"safetensors": WEIGHTS_FILE, "packed": PACKED_FILE}
FORMAT = "nnopt-model"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """Where a model was written and the size of its weights file (the ``file_bytes`` metric).

    ``compression_ratio`` = bytes of the same model as a dense fp32 safetensors file / bytes written.
    """

    path: Path
    file_bytes: int
    meta: dict[str, Any]

    @property
    def compression_ratio(self) -> float:
        return float(self.meta["compression_ratio"])


def save_model(
    model: nn.Module,
    path: str | Path,
    metrics: dict[str, Any] | None = None,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    weights_format: str = "safetensors",
    factory: str | Callable[..., Any] | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    *,
    replay: Callable[[nn.Module, AppliedPass], None] | None = None,
) -> SavedModel:
    """Write ``model`` as an nnopt model directory, atomically (:func:`nnopt.save_model` is this with
    ``replay``, the technique registry's, which a user module's recorded passes need: see below).

    ``weights_format="packed"`` stores sparse positions, bit-packed integer codes and entropy
    coded streams (``model.nnpk``); the default is a standard ``model.safetensors``.

    ``inputs`` are paths this run read from: writing onto or into them is refused. An existing
    ``path`` is replaced only when ``overwrite`` is set and it is an nnopt model directory.

    Any ``nn.Module`` saves. One nnopt did not create records its class's import path
    (``package.module:Name``) as the way to rebuild it, or ``factory`` (``"package.module:function"``, or a
    callable, recorded by its import path when it has one) called with the JSON ``factory_kwargs``.
    Before writing, that record and the recorded passes are rebuilt (on the meta device) and must give
    exactly the model's tensor names, shapes and dtypes; otherwise the error says what to pass.
    A class defined in ``__main__`` or in a function is recorded too, but loading it needs ``factory=``.

    >>> save_model(create_model("simplenet"), "out/simplenet")  # doctest: +SKIP
    >>> save_model(MyNet(width=8), "out/mynet", factory_kwargs={"width": 8})  # doctest: +SKIP
    """
    if weights_format not in WEIGHT_FILES:
        raise ConfigError(f"weights_format must be one of {', '.join(WEIGHT_FILES)}, got {weights_format!r}")
    path = Path(path)
    refuse_input_overlap(path, inputs)
    lineage, dense_bytes = _record_and_dense_bytes(model, factory, factory_kwargs, replay)
    # Clone so tensors that share storage (views, tied weights) serialize independently.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    payload, packing = _serialize(model, tensors, weights_format, lineage.architecture)
    weights_file = WEIGHT_FILES[weights_format]
    if metrics is not None and "file_bytes" in metrics:
        metrics = {**metrics, "file_bytes": len(payload)}  # known only now that it is serialized
    replaceable = (META_FILE, *WEIGHT_FILES.values())
    with atomic_directory(path, replace_if=replaceable if overwrite else None) as tmp:
        write_bytes_durable(tmp / weights_file, payload)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "nnopt_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **lineage.to_dict(),
            "metrics": metrics or {},
            "versions": library_versions(),
            "files": {weights_file: {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}},
            "weights_format": weights_format,
            "dense_fp32_bytes": dense_bytes,
            "compression_ratio": dense_bytes / len(payload),
        }
        if packing is not None:
            meta["packing"] = packing
        write_bytes_durable(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return SavedModel(path=path, file_bytes=len(payload), meta=meta)


def _record_and_dense_bytes(
    model: nn.Module, factory: str | Callable[..., Any] | None, factory_kwargs: Mapping[str, Any] | None,
    replay: Callable[[nn.Module, AppliedPass], None] | None,
) -> tuple[Lineage, int]:
    """The lineage to write and the dense fp32 size of its architecture; a user module's record is
    checked to rebuild ``model`` exactly (see :func:`nnopt.models.user_module.check_rebuild`)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"save_model takes a torch nn.Module, got {type(model).__name__}")
    lineage = get_lineage(model) if has_lineage(model) else user_module_lineage(model)
    if lineage.architecture != USER_MODULE:
        if factory is not None or factory_kwargs is not None:
            raise ConfigError(f"factory and factory_kwargs apply to user modules; this model is nnopt's "
                              f"{lineage.architecture!r}, rebuilt by name")
        return lineage, dense_fp32_bytes(model)
    from nnopt.models.user_module import check_rebuild, save_record

    lineage, builder = save_record(model, lineage, factory, factory_kwargs)
    if replay is None and lineage.applied:
        raise ConfigError(f"{type(model).__name__} is a user module with recorded passes: save it with "
                          "nnopt.save_model, which replays them to check that its record rebuilds it")
    check_rebuild(model, lineage, builder, replay or _no_passes)
    return lineage, _dense_bytes_of(builder)


def _no_passes(model: nn.Module, applied: AppliedPass) -> None:
    raise AssertionError("unreachable: a record with passes needs a replay")  # guarded by the caller


def _dense_bytes_of(builder: Callable[[], nn.Module]) -> int:
    """Bytes of the untrained build as an fp32 safetensors file, from shapes built on the meta device
    (uninitialized CPU memory stands in for the values: only the size is measured)."""
    from safetensors.torch import save as st_save

    try:
        with torch.device("meta"):
            dense = builder()
    except Exception:  # the user's code may not run on the meta device
        dense = builder()
    tensors = {k: torch.empty(tuple(v.shape), dtype=torch.float32 if v.is_floating_point() else v.dtype)
               for k, v in dense.state_dict().items()}
    return len(st_save(tensors, metadata={"format": FORMAT, "architecture": USER_MODULE}))


def _serialize(
    model: nn.Module, tensors: dict[str, torch.Tensor], weights_format: str, architecture: str
) -> tuple[bytes, list[dict[str, Any]] | None]:
    if weights_format == "safetensors":
        from safetensors.torch import save as st_save

        return st_save(tensors, metadata={"format": FORMAT, "architecture": architecture}), None
    from nnopt.io.packed import pack_tensors
    from nnopt.layers.protocol import compressed_layers

    # Integer codes are stored in exactly their bit width (two 4-bit codes per byte, ...).
    code_bits = {
        f"{name}.{key}" if name else key: bits
        for name, layer in compressed_layers(model).items()
        for key, bits in layer.stored_codes().items()
    }
    payload, infos = pack_tensors(tensors, code_bits=code_bits)
    return payload, [dataclasses.asdict(info) for info in infos]


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's architecture, unpruned and unquantized, as an fp32 safetensors file:
    the reference for compression ratios."""
    from safetensors.torch import save as st_save

    from nnopt.models.registry import build_from_lineage

    lineage = get_lineage(model)
    if lineage.architecture == USER_MODULE:
        from nnopt.models.user_module import save_record

        return _dense_bytes_of(save_record(model, lineage, None, None)[1])
    dense = build_from_lineage(Lineage(lineage.architecture, lineage.config))
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in dense.state_dict().items()}
    return len(st_save(tensors, metadata={"format": FORMAT, "architecture": lineage.architecture}))


def weights_file(meta: dict[str, Any]) -> str:
    """The name of the one weights file that a validated record lists."""
    return next(name for name in meta["files"] if name in WEIGHT_FILES.values())


def read_meta(path: str | Path) -> dict[str, Any]:
    """Validate that ``path`` is an nnopt model directory and return its ``nnopt.json``."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_file():
        refuse_unsafe(path)
        raise ModelFormatError(
            f"{path} is a file; an nnopt model is a directory with {WEIGHTS_FILE} and {META_FILE}"
        )
    meta_path = path / META_FILE
    missing = f"{path} is not an nnopt model directory: {META_FILE} is missing"
    meta = read_json_document(meta_path, ModelFormatError, missing, f"{meta_path} is corrupt")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFormatError(f"{meta_path} is not an nnopt model record (format is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{meta_path} has format_version {meta.get('format_version')!r}; this nnopt reads {FORMAT_VERSION}"
        )
    _check_meta_types(meta_path, meta)
    return meta


def _check_meta_types(meta_path: Path, meta: dict[str, Any]) -> None:
    """Field types, so that a hand-edited record fails here with its field named."""
    expected = {"architecture": str, "config": dict, "applied": list, "files": dict}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise ModelFormatError(f"{meta_path}: field {key!r} is missing or not a {kind.__name__}")
    names = [name for name in meta["files"] if name in WEIGHT_FILES.values()]
    if len(names) != 1:
        raise ModelFormatError(f"{meta_path}: files must list exactly one of {', '.join(WEIGHT_FILES.values())}")
    entry = meta["files"][names[0]]
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
        raise ModelFormatError(f"{meta_path}: files.{names[0]} must record its sha256 and bytes")
    if not all(isinstance(p, dict) for p in meta["applied"]):
        raise ModelFormatError(f"{meta_path}: every entry of 'applied' must be a mapping")


def check_tensors(
    where: str | Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], finite: bool = True
) -> None:
    """Names, dtypes and shapes must match exactly (``load_state_dict`` would silently cast them), and
    (with ``finite``) float tensors must hold no NaN or infinity."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise ModelFormatError(f"{where} lacks tensor {missing[0]!r} that the model needs ({len(missing)} missing)")
    if unexpected:
        raise ModelFormatError(
            f"{where} holds tensor {unexpected[0]!r} that the model does not have ({len(unexpected)} unexpected)"
        )
    for name, want in expected.items():  # the model's order, not the file's: names the first layer
        tensor = found[name]
        if tensor.dtype != want.dtype or tensor.shape != want.shape:
            raise ModelFormatError(
                f"{where}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the model needs {want.dtype} {tuple(want.shape)}"
            )
        if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFormatError(f"{where}: tensor {name!r} holds NaN or infinite values")


def read_weights(path: Path, meta: dict[str, Any], max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    name = weights_file(meta)
    weights = path / name
    if not weights.is_file():
        raise ModelFormatError(f"{path} is not a complete nnopt model: {name} is missing")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["files"][name]["sha256"]:
        raise ModelFormatError(f"{weights} is corrupt or was modified: its sha256 does not match {META_FILE}")
    if name == PACKED_FILE:
        from nnopt.io.packed import unpack_tensors

        return unpack_tensors(data, max_bytes=max_bytes)
    from nnopt.io.safetensors_check import load_safetensors_bytes

    # Header checked before safetensors parses it; parser errors become ModelFormatError too.
    return load_safetensors_bytes(data, str(weights))
