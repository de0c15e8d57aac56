"""Recognize files that could execute code when loaded, by content and by name."""

from __future__ import annotations

from pathlib import Path

import torch

from nnopt.errors import ModelFormatError, UnsafeFileError

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


# The flag that lets a weights-only pickle through, as the CLI spells it and as the Python API does.
ALLOW_PICKLE_HINT = "--allow-pickle (allow_pickle=True)"


def load_pickled_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``), only with ``allow_pickle``.

    Even then the file goes through ``torch.load(weights_only=True)``, whose unpickler builds only
    tensors and plain containers: a pickle that would call any other function is refused, never run.
    """
    path = Path(path)
    if not allow_pickle:
        raise UnsafeFileError(
            f"refusing to load {path}: it is a pickle, and loading it could execute code. "
            f"Convert it to safetensors, or pass {ALLOW_PICKLE_HINT} to read it with torch's "
            "weights-only unpickler."
        )
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the outcome is reported below
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global it does not know: that is a file trying to run code.
        raise UnsafeFileError(
            f"refusing to load {path}: it holds objects other than tensors, which the weights-only "
            f"unpickler does not build ({str(exc).splitlines()[0][:200]})"
        ) from None
    except Exception as exc:  # truncated zip, bad magic, ...: name the file, not the library frame
        raise ModelFormatError(f"{path} is not a readable torch.save file: {exc}"[:500]) from None
    return _tensor_dict(loaded, path)


def _tensor_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    # A checkpoint that wraps the weights ({"state_dict": {...}}) is common; unwrap exactly that.
    if isinstance(loaded, dict) and set(loaded) == {"state_dict"}:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ModelFormatError(f"{path} does not hold a flat mapping of tensor names to tensors (a state dict)")
    return dict(loaded)
