"""Keras 3 ``.keras`` files in and out, without letting a file run code.

A ``.keras`` file is a zip holding ``config.json`` (the layers, by module and class name),
``metadata.json`` and the weights (``model.weights.h5``). Keras rebuilds a model by importing the
modules and classes the config names, so :func:`load_keras` reads the zip itself first and accepts
only Keras' own built-in layers that nnopt can convert: a Lambda layer (stored Python code), a
custom object, or any reference outside Keras' own modules is refused before Keras sees the file.
Legacy HDF5 (``.h5``) models are refused outright: their configs can call arbitrary functions.

>>> model = load_keras("simplenet.keras")  # doctest: +SKIP
>>> save_keras(nnopt.prune(model, nnopt.ThresholdPruneConfig(0.01)), "pruned.keras")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from torch import nn

from nnopt.errors import ModelFormatError, NnoptError, OutputError, UnsafeFileError, UnsupportedModelError, brief
from nnopt.io.atomic import clean_leftovers, fsync_dir, refuse_input_overlap, sibling_name
from nnopt.io.safety import refuse_unsafe

# Bounds against zip bombs and absurd configs; real nnopt-sized models are far below them.
MAX_FILE_BYTES = 2 * 1024**3
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3
MAX_CONFIG_BYTES = 16 * 1024**2
MAX_CONFIG_DEPTH = 64

_CONFIG = "config.json"
_METADATA = "metadata.json"
_WEIGHTS = "model.weights.h5"
_MEMBERS = {_CONFIG, _METADATA, _WEIGHTS}

_MODEL_MODULES = {
    "Sequential": {"keras", "keras.models", "keras.src.models.sequential"},
    "Functional": {"keras", "keras.models", "keras.src.models.functional"},
}
_LAYER_MODULES = {"keras.layers"}
# Modules whose CamelCase classes Keras may rebuild inside a layer's config (its dtype policy,
# initializers, regularizers, constraints): all Keras' own, none of them runs stored code.
_AUX_MODULES = {"keras", "keras.dtype_policies", "keras.initializers", "keras.regularizers", "keras.constraints"}
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]*\Z")
# Keras classes that carry code (marshalled lambdas, pickled torch modules, saved graphs).
_CODE_CLASSES = {"Lambda", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "TFSMLayer", "function", "__lambda__"}
_KERAS_TENSOR = "__keras_tensor__"  # a reference to another layer's output in Functional configs

# Where the model came from, so that save_keras never overwrites its own input.
_SOURCE_ATTR = "_nnopt_keras_source"


def load_keras(path: str | Path) -> nn.Module:
    """Read a Keras 3 ``.keras`` file into an equivalent nnopt ``sequential`` model.

    The archive is validated before Keras deserializes anything (see the module docstring), then
    loaded with ``safe_mode=True, compile=False`` on the torch backend and converted by
    :func:`nnopt.models.from_keras`, which checks the outputs against Keras'. Raises
    :class:`UnsafeFileError` (``.h5``, Lambda layers, custom or foreign objects),
    :class:`ModelFormatError` (missing, corrupt or malformed files) or
    :class:`UnsupportedModelError` (layers nnopt cannot convert).
    """
    path = Path(path)
    refuse_unsafe(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.suffix != ".keras":
        raise ModelFormatError(f"{path}: expected a Keras 3 .keras file")
    from nnopt.models.keras_adapter import from_keras, import_keras

    with tempfile.TemporaryDirectory(prefix="nnopt-keras-") as tmp:
        # Keras reads a private copy: exactly the bytes validated here, whatever happens to ``path``.
        copy = Path(tmp) / "model.keras"
        _copy_bounded(path, copy)
        check_keras_archive(copy, shown_as=path)
        keras = import_keras()
        try:
            km = keras.saving.load_model(copy, safe_mode=True, compile=False)
        except Exception as exc:  # Keras and h5py raise many types for damaged files
            raise ModelFormatError(f"{path}: Keras could not load it ({brief(exc)})") from None
        try:
            model = from_keras(km)
        except NnoptError:
            raise
        except Exception as exc:  # a Keras layer that fails in an unexpected way while being read
            raise ModelFormatError(f"{path}: could not convert it ({brief(exc)})") from None
    object.__setattr__(model, _SOURCE_ATTR, str(path.resolve()))
    return model


def save_keras(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a Keras 3 ``.keras`` file at ``path`` and return the path.

    The Keras twin is built by :func:`nnopt.models.keras_export.to_keras`: pruned zeros stay zeros,
    structurally pruned layers stay narrower, and weight-quantized (and clustered) layers are
    written as their dequantized float weights, since a ``.keras`` file cannot hold integer codes.
    Its outputs are checked against ``model``'s on random input (within 1e-4) before anything is
    written. The file appears atomically (written in a temporary directory beside it, then renamed).
    An existing file is replaced only with ``overwrite=True``, and never the file ``model`` was
    loaded from. Raises :class:`UnsupportedModelError` naming layers without a Keras equivalent and
    :class:`OutputError` for an unusable ``path``.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise OutputError(f"refusing to write {path}: a Keras model file must end in .keras")
    source = getattr(model, _SOURCE_ATTR, None)
    if source is not None:
        refuse_input_overlap(path, [Path(source)])
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"refusing to write {path}: it is a symbolic link or not a regular file")
    if path.exists() and not overwrite:
        raise OutputError(f"refusing to overwrite {path}: it exists (pass overwrite=True to replace it)")
    from nnopt.models.keras_export import to_keras

    km = to_keras(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        # A staging directory beside the output (Keras insists on a file name ending in .keras),
        # named so that a later write removes it if this process dies before the rename.
        staging = sibling_name(path, "tmp")
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from None
    try:
        tmp = staging / "model.keras"
        try:
            km.save(tmp)
            _fsync(tmp)
        except Exception as exc:  # Keras and h5py raise many types for unwritable places
            raise OutputError(f"cannot write {path}: {brief(exc)}") from None
        check_keras_archive(tmp, shown_as=path)  # never write a file that load_keras would refuse
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def check_keras_archive(path: Path, shown_as: Path | None = None) -> dict[str, Any]:
    """Validate a ``.keras`` zip without Keras and return its parsed ``config.json``.

    Checks member names (only config, metadata and weights; no absolute or ``..`` paths, no
    duplicates, no encryption), a bound on the uncompressed size, every member's CRC, the JSON
    files, that the config holds only built-in Keras layers nnopt converts (see the module
    docstring), and that the weights the config declares are no more than the weights file holds
    (a config cannot make Keras allocate what no file backs).
    """
    shown = shown_as or path
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="nnopt-keras-") as tmp:
            _check_members(archive.infolist(), shown)
            bad = archive.testzip()  # reads every member once: catches damaged data before h5py does
            if bad is not None:
                raise ModelFormatError(f"{shown}: member {bad!r} is corrupt (CRC mismatch)")
            config = _read_json(archive, _CONFIG, shown)
            if _METADATA in archive.namelist():
                _read_json(archive, _METADATA, shown)
            stored = _stored_weight_bytes(Path(archive.extract(_WEIGHTS, tmp)), shown)
        layers = _check_config(config, shown)
        declared = 4 * _declared_weights(config["class_name"], layers, config.get("build_config"), shown)
    except NnoptError:
        raise
    except Exception as exc:  # zipfile and h5py raise BadZipFile, zlib.error, EOFError, OSError, ...
        raise ModelFormatError(f"{shown}: not a valid .keras archive ({brief(exc)})") from None
    if declared > stored:
        raise ModelFormatError(
            f"{shown}: config.json declares at least {declared:,} bytes of float32 weights, but the weights "
            f"file holds {stored:,}"
        )
    return config


def _stored_weight_bytes(weights: Path, shown: Path) -> int:
    """Bytes of all arrays in the HDF5 weights file (read from its metadata, not its data)."""
    with open(weights, "rb") as fh:
        if fh.read(8) != b"\x89HDF\r\n\x1a\n":
            raise ModelFormatError(f"{shown}: {_WEIGHTS} is not an HDF5 file")
    try:
        import h5py
    except ImportError:
        raise UnsupportedModelError("reading .keras files needs h5py (installed with Keras)") from None
    sizes: list[int] = []

    def visit(_name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if obj.dtype.kind not in "fiub":
                raise ModelFormatError(f"{shown}: {_WEIGHTS} holds a non-numeric array ({obj.name})")
            sizes.append(int(obj.size) * obj.dtype.itemsize)

    with h5py.File(weights, "r") as h5:
        h5.visititems(visit)
    # h5py may hold arrays compressed inside the file: bound what they expand to as well.
    if sum(sizes) > MAX_UNCOMPRESSED_BYTES:
        raise ModelFormatError(
            f"{shown}: the weights would expand to {sum(sizes):,} bytes (limit {MAX_UNCOMPRESSED_BYTES:,})"
        )
    return sum(sizes)


def _check_members(infos: list[zipfile.ZipInfo], shown: Path) -> None:
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise ModelFormatError(f"{shown}: the archive holds duplicate member names")
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith(("/", "\\")) or "\\" in name or "\0" in name or ".." in name.split("/") or ":" in name:
            raise UnsafeFileError(f"refusing to load {shown}: unsafe member name {name!r} in the archive")
        if name not in _MEMBERS:
            raise ModelFormatError(
                f"{shown}: unexpected member {name!r}; a .keras file of built-in layers holds only "
                + ", ".join(sorted(_MEMBERS))
            )
        if info.flag_bits & 0x1:
            raise ModelFormatError(f"{shown}: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ModelFormatError(f"{shown}: member {name!r} uses an unsupported compression method")
        total += info.file_size
    if total > MAX_UNCOMPRESSED_BYTES:
        raise ModelFormatError(
            f"{shown}: the archive would expand to {total:,} bytes (limit {MAX_UNCOMPRESSED_BYTES:,}); "
            "refusing a possible zip bomb"
        )
    if _CONFIG not in names:
        raise ModelFormatError(f"{shown}: no config.json in the archive; not a Keras 3 .keras file")
    if _WEIGHTS not in names:
        raise ModelFormatError(f"{shown}: no {_WEIGHTS} in the archive")


def _read_json(archive: zipfile.ZipFile, name: str, shown: Path) -> Any:
    if archive.getinfo(name).file_size > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"{shown}: {name} is larger than {MAX_CONFIG_BYTES:,} bytes")
    with archive.open(name) as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{shown}: {name} is not valid JSON ({brief(exc)})") from None


def _check_config(config: Any, shown: Path) -> list[dict[str, Any]]:
    """Allow a Sequential/Functional model of supported built-in layers, and nothing else; return the layers."""
    from nnopt.models.keras_adapter import SUPPORTED_KERAS_LAYERS

    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise ModelFormatError(f"{shown}: config.json does not describe a Keras object")
    _check_reference(config, "the model", shown)  # foreign and custom objects are named first
    kind, module = config["class_name"], config["module"]
    if kind not in _MODEL_MODULES or module not in _MODEL_MODULES[kind]:
        raise UnsupportedModelError(
            f"{shown}: the model is a {kind!r} (module {module!r}); nnopt reads Keras Sequential and "
            "Functional models"
        )
    body = config.get("config")
    if not isinstance(body, dict) or not isinstance(body.get("layers"), list) or not body["layers"]:
        raise ModelFormatError(f"{shown}: config.json holds no list of layers")
    # compile_config is never read: Keras drops it when loading with compile=False.
    skip = {"module", "class_name", "registered_name", "config", "compile_config"}
    _walk([v for k, v in config.items() if k not in skip], "the model", shown, 1)
    _walk([v for k, v in body.items() if k != "layers"], "the model", shown, 1)
    for index, layer in enumerate(body["layers"]):
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            raise ModelFormatError(f"{shown}: layer #{index} in config.json is not a Keras layer config")
        name = layer["config"].get("name", f"#{index}")
        where = f"layer {name!r}"
        _check_reference(layer, where, shown)
        if layer["class_name"] in _MODEL_MODULES:
            raise UnsupportedModelError(f"{shown}: {where} is a nested model; nnopt reads flat chains of layers")
        if layer.get("module") not in _LAYER_MODULES or layer["class_name"] not in SUPPORTED_KERAS_LAYERS:
            raise UnsupportedModelError(
                f"{shown}: {where} ({layer['class_name']}) is not supported; nnopt reads "
                + ", ".join(SUPPORTED_KERAS_LAYERS)
            )
        for key, value in layer.items():
            if key not in ("module", "class_name", "registered_name"):
                _walk(value, where, shown, 2)
    return body["layers"]


def _check_reference(obj: dict[str, Any], where: str, shown: Path) -> None:
    """Refuse code-carrying classes, custom objects and modules outside Keras' own."""
    kind, module = obj.get("class_name"), obj.get("module")
    if not isinstance(kind, str):
        raise ModelFormatError(f"{shown}: {where} has no class name in config.json")
    if kind in _CODE_CLASSES:
        raise UnsafeFileError(
            f"refusing to load {shown}: {where} is a {kind} object, whose stored code would run when loaded"
        )
    if not isinstance(module, str) or (module != "keras" and not module.startswith("keras.")):
        raise UnsafeFileError(
            f"refusing to load {shown}: {where} refers to {kind!r} in module {module!r}, outside Keras; "
            "loading it could import and run that code"
        )
    registered = obj.get("registered_name")
    if registered not in (None, kind):
        raise UnsafeFileError(
            f"refusing to load {shown}: {where} refers to the custom object {registered!r}, whose code "
            "would have to be imported"
        )


def _walk(value: Any, where: str, shown: Path, depth: int) -> None:
    """Check every serialized object nested inside a layer's or the model's config."""
    if depth > MAX_CONFIG_DEPTH:
        raise ModelFormatError(f"{shown}: config.json is nested more than {MAX_CONFIG_DEPTH} levels deep")
    if isinstance(value, list):
        for item in value:
            _walk(item, where, shown, depth + 1)
        return
    if not isinstance(value, dict):
        return
    if "class_name" in value or "module" in value or "registered_name" in value:
        kind = value.get("class_name")
        if not (kind == _KERAS_TENSOR and "module" not in value and "registered_name" not in value):
            _check_reference(value, where, shown)
            if value["module"] not in _AUX_MODULES or not _CLASS_NAME.match(kind):
                raise UnsafeFileError(
                    f"refusing to load {shown}: {where} refers to {value['module']}.{kind}, which nnopt does "
                    "not allow inside a layer (only dtype policies, initializers, regularizers and constraints)"
                )
    for item in value.values():
        _walk(item, where, shown, depth + 1)


def _declared_weights(kind: str, layers: list[dict[str, Any]], build: Any, shown: Path) -> int:
    """A lower bound on the float weights Keras would allocate for ``layers`` (kernels and norms).

    Shapes follow the chain as Keras builds it: from the Input (or a recorded build shape) through
    each layer, a Functional layer reading the output of the layer its inbound node names.
    """
    outputs: dict[str, tuple[int, ...] | None] = {}
    shape = _dims(build.get("input_shape"), shown) if isinstance(build, dict) else None
    total = 0
    for layer in layers:
        cfg = layer["config"]
        if kind == "Functional":
            shape = outputs.get(_inbound_name(layer))
        recorded = layer.get("build_config")
        if isinstance(recorded, dict) and recorded.get("input_shape") is not None:
            shape = _dims(recorded["input_shape"], shown)
        if layer["class_name"] == "InputLayer":
            shape = _dims(cfg.get("batch_shape", cfg.get("batch_input_shape")), shown)
        weights, shape = _layer_weights(layer["class_name"], cfg, shape, shown)
        total += weights
        outputs[str(cfg.get("name"))] = shape
    return total


def _layer_weights(
    kind: str, cfg: dict[str, Any], shape: tuple[int, ...] | None, shown: Path
) -> tuple[int, tuple[int, ...] | None]:
    """(weights the layer allocates, its output shape) for input ``shape`` (None: unknown)."""
    if shape is None or not shape:
        return 0, None
    if kind == "Dense":
        units = _int(cfg.get("units"), "units", shown)
        return shape[-1] * units, (*shape[:-1], units)
    if kind == "BatchNormalization":
        return 4 * shape[-1], shape
    if kind == "Flatten":
        return 0, (math.prod(shape),)
    if kind not in ("Conv2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D"):
        return 0, shape  # element-wise layers and the Input
    if len(shape) != 3 or cfg.get("data_format", "channels_last") != "channels_last":
        return 0, None  # nnopt refuses these later; nothing to bound here
    h, w, c = shape
    if kind == "GlobalAveragePooling2D":
        return 0, ((1, 1, c) if cfg.get("keepdims") else (c,))
    window = cfg.get("kernel_size") if kind == "Conv2D" else cfg.get("pool_size")
    kh, kw = (_int(v, "window", shown) for v in _pair_of(window, shown))
    strides = cfg.get("strides") or window
    sh, sw = (max(_int(v, "strides", shown), 1) for v in _pair_of(strides, shown))
    same = cfg.get("padding") == "same"
    out_hw = [-(-n // s) if same else max((n - k) // s + 1, 0) for n, k, s in ((h, kh, sh), (w, kw, sw))]
    if kind != "Conv2D":
        return 0, (*out_hw, c)
    filters = _int(cfg.get("filters"), "filters", shown)
    groups = max(_int(cfg.get("groups", 1), "groups", shown), 1)
    return kh * kw * (c // groups) * filters, (*out_hw, filters)


def _inbound_name(layer: dict[str, Any]) -> str | None:
    # inbound_nodes: [{"args": [{"class_name": "__keras_tensor__", "config": {"keras_history": [name, ...]}}]}]
    try:
        return str(layer["inbound_nodes"][0]["args"][0]["config"]["keras_history"][0])
    except (KeyError, IndexError, TypeError):
        return None


def _dims(value: Any, shown: Path) -> tuple[int, ...] | None:
    """A recorded shape without its batch dimension; None when any dimension is unknown."""
    if not isinstance(value, list) or len(value) < 2 or any(v is None for v in value[1:]):
        return None
    return tuple(_int(v, "shape", shown) for v in value[1:])


def _pair_of(value: Any, shown: Path) -> list[Any]:
    if isinstance(value, int):
        return [value, value]
    if not isinstance(value, list) or len(value) != 2:
        raise ModelFormatError(f"{shown}: config.json holds a malformed window or stride {value!r}")
    return value


def _int(value: Any, what: str, shown: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31:
        raise ModelFormatError(f"{shown}: config.json holds a malformed {what} value {value!r}")
    return value


def _copy_bounded(src: Path, dst: Path) -> None:
    try:
        size = src.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ModelFormatError(f"{src}: {size:,} bytes is larger than the {MAX_FILE_BYTES:,}-byte limit")
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except OSError as exc:
        raise ModelFormatError(f"{src}: cannot read it ({exc})") from None


def _fsync(path: Path) -> None:
    if path.is_dir():
        fsync_dir(path)
        return
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
