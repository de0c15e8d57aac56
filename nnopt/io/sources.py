"""Open a model from any source nnopt reads, through one registry of source kinds.

A source is a path (an nnopt model directory, a Hugging Face encoder directory, a ``.keras`` or
``.onnx`` file) or a ``package.module:factory`` spec. Each kind has a test and a loader; the first
kind whose test matches opens it. Kinds that could execute code when loaded (pickles, Keras
``.h5``) are registered as refusals, so they are named plainly instead of "unknown".

:data:`LOADERS` names each file-level loader with one ``(path) -> object`` signature; every one
raises only :class:`~nnopt.errors.NnoptError` subclasses on bad input (fuzzed that way).

>>> model = open_model("out/simplenet")  # doctest: +SKIP
>>> model = open_model("mypkg.nets:make_mlp", weights="mlp.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnopt.errors import ConfigError, ModelFormatError, NnoptError, UnsafeFileError, UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What the caller allowed: a weights file (factories only), weights-only pickles, and importing the
    package a saved user module's record names (None: as :func:`nnopt.loading.trusting_imports` says)."""

    weights: Path | None = None
    allow_pickle: bool = False
    trust_import: bool | None = None


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One kind of source: ``matches(text, path)`` decides, ``load(text, path, options)`` opens."""

    name: str
    accepts: str  # how the error for an unknown source describes it
    matches: Callable[[str, Path], bool]
    load: Callable[[str, Path, LoadOptions], Any]
    takes_weights: bool = False


SOURCE_KINDS: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> None:
    """Add a kind; kinds are tried in registration order. A duplicate name is an error."""
    if kind.name in SOURCE_KINDS:
        raise ValueError(f"source kind {kind.name!r} is already registered")
    SOURCE_KINDS[kind.name] = kind


def source_kind(source: str | Path) -> SourceKind:
    """The registered kind that ``source`` is, or a :class:`ModelFormatError` listing what is accepted."""
    text = str(source)
    path = Path(source)
    for kind in SOURCE_KINDS.values():
        if kind.matches(text, path):
            return kind
    accepted = "; ".join(k.accepts for k in SOURCE_KINDS.values() if k.accepts)
    where = "no such file or directory" if not path.exists() else "not a model nnopt recognizes"
    raise ModelFormatError(f"{text}: {where}. nnopt reads: {accepted}")


def open_model(
    source: str | Path, *, weights: str | Path | None = None, allow_pickle: bool = False,
    trust_import: bool | None = None,
) -> Any:
    """Load a model from ``source``: an ``nn.Module`` (nnopt, Keras, Hugging Face or a factory's)
    or, for ``.onnx``, a checked ``onnx.ModelProto``.

    ``weights`` is for ``package.module:factory`` sources only. ``allow_pickle`` lets ``.pt``/
    ``.pth``/``.bin`` weights through torch's weights-only unpickler; nothing else ever unpickles.
    ``trust_import``: an nnopt directory saved from your own ``nn.Module`` is rebuilt by importing the
    package its record names (see :func:`nnopt.loading.load_model`); without it that is refused.
    """
    kind = source_kind(source)
    if weights is not None and not kind.takes_weights:
        raise ConfigError(f"--weights applies to package.module:factory sources, not to a {kind.name} source")
    options = LoadOptions(weights=Path(weights) if weights is not None else None, allow_pickle=allow_pickle,
                          trust_import=trust_import)
    return _guarded(kind.name, lambda: kind.load(str(source), Path(source), options), str(source))


def _guarded(kind: str, load: Callable[[], Any], where: str) -> Any:
    """Run a loader; any exception that is not nnopt's own becomes a :class:`ModelFormatError`."""
    try:
        return load()
    except NnoptError:
        raise
    except ImportError as exc:
        raise UnsupportedModelError(f"{where}: reading a {kind} source needs {exc.name or exc}: "
                                    "pip install the matching nnopt extra") from None
    except Exception as exc:  # foreign libraries' errors on hostile or corrupt input
        raise ModelFormatError(f"{where} is not a readable {kind} model: {type(exc).__name__}: {exc}"[:500]) from None


# --- loaders --------------------------------------------------------------------------------------


def _load_nnopt_dir(path: Path, trust_import: bool | None = None) -> Any:
    from nnopt.loading import load_model

    return load_model(path, trust_import=trust_import)


def _load_safetensors(path: Path) -> Any:
    from nnopt.io.safetensors_check import load_safetensors

    return load_safetensors(path)


def _load_packed(path: Path) -> Any:
    from nnopt.io.packed import unpack_tensors

    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    return unpack_tensors(path.read_bytes())


def _load_keras(path: Path) -> Any:
    import importlib

    try:
        keras_file = importlib.import_module("nnopt.io.keras_file")
    except ModuleNotFoundError as exc:
        raise UnsupportedModelError(f"{path}: reading .keras files needs {exc.name}") from None
    return keras_file.load_keras(path)


def _load_onnx(path: Path) -> Any:
    from nnopt.io.onnx_import import load_onnx

    return load_onnx(path)


def _load_hf_dir(path: Path, allow_pickle: bool = False) -> Any:
    from nnopt.models.hf_encoder import load_hf_encoder

    return load_hf_encoder(path, allow_pickle=allow_pickle)


def _guard_loader(name: str, load: Callable[[Path], Any]) -> Callable[[Path], Any]:
    @functools.wraps(load)
    def guarded(path: Path) -> Any:
        return _guarded(name, lambda: load(Path(path)), str(path))

    return guarded


# File-level loaders by name: each takes a path and raises only NnoptError subclasses on bad input.
LOADERS: dict[str, Callable[[Path], object]] = {
    name: _guard_loader(name, load)
    for name, load in {
        "nnopt-dir": _load_nnopt_dir,
        "safetensors": _load_safetensors,
        "packed": _load_packed,
        "keras": _load_keras,
        "onnx": _load_onnx,
        "hf-dir": _load_hf_dir,
    }.items()
}


# --- source kinds, in the order they are tried ----------------------------------------------------


def _is_nnopt_dir(text: str, path: Path) -> bool:
    from nnopt.io.model_dir import META_FILE

    return path.is_dir() and (path / META_FILE).is_file()


def _is_hf_dir(text: str, path: Path) -> bool:
    from nnopt.models.hf_encoder import is_hf_encoder_dir

    return path.is_dir() and is_hf_encoder_dir(path)


def _suffix(*suffixes: str) -> Callable[[str, Path], bool]:
    return lambda text, path: path.suffix.lower() in suffixes and path.is_file()


def _is_pickle(text: str, path: Path) -> bool:
    from nnopt.io.safety import sniff_unsafe

    return path.is_file() and sniff_unsafe(path) is not None


def _is_factory(text: str, path: Path) -> bool:
    from nnopt.io.torch_factory import is_factory_spec

    return not path.exists() and is_factory_spec(text)


def _refuse_unsafe(text: str, path: Path, options: LoadOptions) -> Any:
    from nnopt.io.safety import refuse_unsafe, sniff_unsafe

    if options.allow_pickle and sniff_unsafe(path) and path.suffix.lower() not in (".h5", ".hdf5"):
        # --allow-pickle is for weights given to a factory; a pickle alone does not say what model it is.
        raise UnsafeFileError(f"refusing to load {path}: a pickled model is not a model nnopt can rebuild; "
                              "give its architecture as package.module:factory with --weights")
    refuse_unsafe(path)  # raises: the kind matched because the file sniffed as unsafe
    raise UnsafeFileError(f"refusing to load {path}: it could execute code when loaded")


def _weights_only(text: str, path: Path, options: LoadOptions) -> Any:
    raise ModelFormatError(f"{path} holds weights only, no architecture: give the model as "
                           f"package.module:factory --weights {path}, or use an nnopt model directory")


def _open_factory(text: str, path: Path, options: LoadOptions) -> Any:
    from nnopt.io.torch_factory import load_torch_factory

    return load_torch_factory(text, options.weights, allow_pickle=options.allow_pickle)


for _kind in (
    SourceKind("nnopt-dir", "an nnopt model directory (nnopt.json + weights)", _is_nnopt_dir,
               lambda text, path, options: _load_nnopt_dir(path, options.trust_import)),
    SourceKind("hf-dir", "a Hugging Face BERT encoder directory (config.json + model.safetensors)", _is_hf_dir,
               lambda text, path, options: _load_hf_dir(path, allow_pickle=options.allow_pickle)),
    SourceKind("keras", "a Keras 3 .keras file", _suffix(".keras"), lambda text, path, options: _load_keras(path)),
    SourceKind("onnx", "an .onnx file", _suffix(".onnx"), lambda text, path, options: _load_onnx(path)),
    SourceKind("unsafe", "", _is_pickle, _refuse_unsafe),
    SourceKind("weights-only", "", _suffix(".safetensors", ".nnpk"), _weights_only),
    SourceKind("factory", "package.module:factory [--weights W.safetensors]", _is_factory, _open_factory,
               takes_weights=True),
):
    register_source(_kind)
