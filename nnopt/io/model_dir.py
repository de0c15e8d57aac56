"""nnopt model directories: ``model.safetensors`` (weights) + ``nnopt.json`` (everything else).

``nnopt.json`` records the architecture and its config, the passes applied with their settings,
metrics, library versions, and the sha256 and size of each file. Loading rebuilds the model
from that record and reads tensors with safetensors: nothing stored is ever executed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt._version import __version__
from nnopt.errors import ModelFormatError, NnoptError
from nnopt.io.atomic import atomic_directory, refuse_input_overlap, sha256_file, write_bytes_durable
from nnopt.io.safety import refuse_unsafe
from nnopt.lineage import Lineage, get_lineage, set_lineage

WEIGHTS_FILE = "model.safetensors"
META_FILE = "nnopt.json"
FORMAT = "nnopt-model"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """Where a model was written and the size of its weights file (the ``file_bytes`` metric)."""

    path: Path
    file_bytes: int
    meta: dict[str, Any]


def save_model(
    model: nn.Module,
    path: str | Path,
    metrics: dict[str, Any] | None = None,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> SavedModel:
    """Write ``model`` as an nnopt model directory, atomically.

    ``inputs`` are paths this run read from: writing onto or into them is refused. An existing
    ``path`` is replaced only when ``overwrite`` is set and it is an nnopt model directory.

    >>> save_model(create_model("simplenet"), "out/simplenet")  # doctest: +SKIP
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    refuse_input_overlap(path, inputs)
    lineage = get_lineage(model)
    # Clone so tensors that share storage (views, tied weights) serialize independently.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    payload = st_save(tensors, metadata={"format": FORMAT, "architecture": lineage.architecture})
    if metrics is not None and "file_bytes" in metrics:
        metrics = {**metrics, "file_bytes": len(payload)}  # known only now that it is serialized
    with atomic_directory(path, replace_if=(META_FILE, WEIGHTS_FILE) if overwrite else None) as tmp:
        write_bytes_durable(tmp / WEIGHTS_FILE, payload)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "nnopt_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **lineage.to_dict(),
            "metrics": metrics or {},
            "versions": library_versions(),
            "files": {WEIGHTS_FILE: {"bytes": len(payload), "sha256": sha256_file(tmp / WEIGHTS_FILE)}},
        }
        write_bytes_durable(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return SavedModel(path=path, file_bytes=len(payload), meta=meta)


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
    if not meta_path.is_file():
        raise ModelFormatError(f"{path} is not an nnopt model directory: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{meta_path} is corrupt: {exc}") from None
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
    entry = meta["files"].get(WEIGHTS_FILE)
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
        raise ModelFormatError(f"{meta_path}: files.{WEIGHTS_FILE} must record its sha256 and bytes")
    if not all(isinstance(p, dict) for p in meta["applied"]):
        raise ModelFormatError(f"{meta_path}: every entry of 'applied' must be a mapping")


def load_model(path: str | Path) -> nn.Module:
    """Load an nnopt model directory without executing any stored code.

    The weights file's sha256 must match the record; the architecture is rebuilt by name, the
    recorded passes re-create their structure, then tensors are loaded strictly.
    """
    from nnopt.models.registry import build_from_lineage
    from nnopt.passes import replay_structure

    path = Path(path)
    meta = read_meta(path)
    tensors = _read_weights(path, meta)
    lineage = Lineage.from_dict(meta)
    try:
        model = build_from_lineage(lineage)
        for applied in lineage.applied:
            replay_structure(model, applied)
    except NnoptError:
        raise
    except (KeyError, AttributeError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelFormatError(f"{path / META_FILE} describes a model that cannot be built: {exc!r}") from None
    _check_tensors(path, model.state_dict(), tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[1].strip() if len(lines) > 1 else lines[0]  # line 0 is torch's generic preamble
        raise ModelFormatError(f"{path / WEIGHTS_FILE} does not match the recorded architecture: {reason}") from None
    set_lineage(model, lineage)
    for module in model.modules():
        check = getattr(module, "check_loaded", None)
        if callable(check):
            check()
    return model.eval()


def _check_tensors(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Names, dtypes and shapes must match exactly: load_state_dict would silently cast them."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"{path / WEIGHTS_FILE} does not match the recorded architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in found.items():
        want = expected[name]
        if tensor.dtype != want.dtype or tensor.shape != want.shape:
            raise ModelFormatError(
                f"{path / WEIGHTS_FILE}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the architecture needs {want.dtype} {tuple(want.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFormatError(f"{path / WEIGHTS_FILE}: tensor {name!r} holds NaN or infinite values")


def _read_weights(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFormatError(f"{path} is not a complete nnopt model: {WEIGHTS_FILE} is missing")
    data = weights.read_bytes()
    expected = meta["files"][WEIGHTS_FILE]["sha256"]
    import hashlib

    if hashlib.sha256(data).hexdigest() != expected:
        raise ModelFormatError(f"{weights} is corrupt or was modified: its sha256 does not match {META_FILE}")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{weights} is not a valid safetensors file: {exc}") from None


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors

    return {
        "nnopt": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
