"""Recognize files that could execute code when loaded, by content and by name."""

from __future__ import annotations

from pathlib import Path

from nnopt.errors import UnsafeFileError

_PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".npy", ".npz"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


def sniff_unsafe(path: Path) -> str | None:
    """A description of why ``path`` is unsafe to load, or None if nothing suggests it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "it is a Python pickle"
    if head.startswith(_ZIP_MAGIC) and path.suffix in {".pt", ".pth", ".ckpt", ".bin", ""}:
        return "it is a torch.save archive (pickle inside a zip)"
    if head.startswith(_HDF5_MAGIC) or path.suffix in {".h5", ".hdf5"}:
        return "it is a Keras HDF5 (.h5) file, whose configs can call arbitrary functions"
    if path.suffix in _PICKLE_SUFFIXES:
        return f"its suffix {path.suffix} is used for pickled objects"
    return None


def refuse_unsafe(path: Path) -> None:
    reason = sniff_unsafe(path)
    if reason:
        raise UnsafeFileError(
            f"refusing to load {path}: {reason}, and loading it could execute code. "
            "Save the weights as safetensors (nnopt model directory) instead."
        )
