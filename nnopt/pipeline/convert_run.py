"""``nnopt convert`` (any source -> nnopt directory, .keras or .onnx) and ``nnopt quantize-onnx``.

Outputs are checked before anything is loaded (an existing output needs ``--overwrite``, an input
is never written), and written atomically, so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nnopt.errors import ConfigError, OutputError, UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What was read and what was written; ``params`` counts the model's weight values."""

    source: str
    source_kind: str
    bytes_read: int
    params: int
    out: Path
    out_kind: str
    bytes_written: int

    def __str__(self) -> str:
        return (f"read  {self.source} ({self.source_kind}): {self.params:,} params, {self.bytes_read:,} bytes\n"
                f"wrote {self.out} ({self.out_kind}): {self.bytes_written:,} bytes")


@dataclasses.dataclass(frozen=True)
class QuantizeOnnxResult:
    """File bytes before and after, and the largest output difference on random inputs (measured)."""

    source: Path
    out: Path
    bytes_before: int
    bytes_after: int
    max_abs_diff: float
    per_channel: bool
    weight_type: str = "uint8"

    def __str__(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        scales = "per channel" if self.per_channel else "per tensor"
        kernels = "U8U8, exact on every CPU" if self.weight_type == "uint8" else "U8S8, needs VNNI to be exact"
        return (f"{self.source}: {self.bytes_before:,} bytes\n"
                f"{self.out}: {self.bytes_after:,} bytes (8-bit dynamic, {self.weight_type} weights: {kernels}; "
                f"weight scales {scales}; "
                f"before/after {ratio:.2f}x)\n"
                f"max |output difference| on random inputs (ONNX Runtime, both models): {self.max_abs_diff:.3g}")


# --- outputs: how each kind is checked before loading and then written ----------------------------


@dataclasses.dataclass(frozen=True)
class OutputKind:
    name: str
    check: Callable[[Path, list[Path], bool], None]
    write: Callable[[Any, Path, list[Path], bool], int]  # returns bytes written


def _check_nnopt_dir(out: Path, inputs: list[Path], overwrite: bool) -> None:
    from nnopt.io.atomic import check_replaceable, refuse_input_overlap
    from nnopt.io.model_dir import META_FILE, WEIGHT_FILES

    refuse_input_overlap(out, inputs)
    check_replaceable(out, (META_FILE, *WEIGHT_FILES.values()) if overwrite else None)


def _write_nnopt_dir(model: Any, out: Path, inputs: list[Path], overwrite: bool) -> int:
    from nnopt.saving import save_model

    saved = save_model(model, out, inputs=inputs, overwrite=overwrite)
    return sum(f.stat().st_size for f in saved.path.iterdir() if f.is_file())


def _check_file(out: Path, inputs: list[Path], overwrite: bool) -> None:
    from nnopt.io.atomic import refuse_input_overlap

    refuse_input_overlap(out, inputs)
    if out.is_symlink() or out.is_dir():
        raise OutputError(f"refusing to write {out}: it is a {'symbolic link' if out.is_symlink() else 'directory'}")
    if out.exists() and not overwrite:
        raise OutputError(f"refusing to overwrite {out}: it exists (pass --overwrite to replace it)")


def _write_onnx(model: Any, out: Path, inputs: list[Path], overwrite: bool, int8_weights: str = "uint8") -> int:
    from nnopt.io.onnx_export import export_onnx
    from nnopt.metrics.speed import example_batch

    export_onnx(model, example_batch(model, 2), path=out, int8_weights=int8_weights)
    return out.stat().st_size


def _write_openvino(model: Any, out: Path, inputs: list[Path], overwrite: bool) -> int:
    from nnopt.io.onnx_export import export_onnx
    from nnopt.io.openvino_export import write_openvino
    from nnopt.metrics.speed import example_batch

    xml, weights = write_openvino(export_onnx(model, example_batch(model, 2)), out)
    return xml.stat().st_size + weights.stat().st_size


def _write_keras(model: Any, out: Path, inputs: list[Path], overwrite: bool) -> int:
    import importlib

    try:
        keras_file = importlib.import_module("nnopt.io.keras_file")
    except ModuleNotFoundError as exc:
        raise UnsupportedModelError(f"writing .keras files needs {exc.name}") from None
    keras_file.save_keras(model, out, overwrite=overwrite)
    return out.stat().st_size


OUTPUT_KINDS: dict[str, OutputKind] = {
    ".onnx": OutputKind("ONNX", _check_file, _write_onnx),
    ".keras": OutputKind("Keras 3 file", _check_file, _write_keras),
    ".xml": OutputKind("OpenVINO IR (.xml + .bin)", _check_file, _write_openvino),
}
NNOPT_DIR = OutputKind("nnopt model directory", _check_nnopt_dir, _write_nnopt_dir)


def output_kind(out: Path) -> OutputKind:
    """By suffix; anything else is an nnopt model directory."""
    return OUTPUT_KINDS.get(out.suffix.lower(), NNOPT_DIR)


# --- convert ---------------------------------------------------------------------------------------


def run_convert(
    source: str,
    out: str | Path,
    weights: str | Path | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    input_shape: Sequence[int] | None = None,
    int8_weights: str = "uint8",
) -> ConvertResult:
    """Read ``source`` (see :func:`nnopt.io.sources.open_model`) and write it to ``out``.

    ``int8_weights`` applies to an ``.onnx`` output (:func:`nnopt.io.onnx_export.export_onnx`): ``uint8``
    (U8U8, right on every CPU) or ``int8`` (faster with VNNI, refused where it would be wrong here).

    A torch module from a factory becomes an nnopt ``sequential`` model first (see
    :func:`nnopt.io.torch_factory.to_nnopt`; ``input_shape`` is needed when its first layer is not
    a Linear), so that every output reloads without the user's code.
    """
    from nnopt.io.sources import open_model, source_kind

    out = Path(out)
    kind = source_kind(source)
    inputs = [Path(p) for p in (source, weights) if p is not None and Path(p).exists()]
    writer = output_kind(out)
    writer.check(out, inputs, overwrite)  # before loading: a refusal comes first, not after the work
    if writer.write is _write_onnx:
        from nnopt.io.onnx_export import resolve_int8_weights

        resolve_int8_weights(int8_weights)  # refused before loading too
        writer = dataclasses.replace(writer, write=functools.partial(_write_onnx, int8_weights=int8_weights))
    elif int8_weights != "uint8":
        raise ConfigError("--int8-weights applies to an .onnx output only")
    loaded = open_model(source, weights=weights, allow_pickle=allow_pickle)
    model = as_nnopt_model(loaded, input_shape, source)
    written = writer.write(model, out, inputs, overwrite)
    return ConvertResult(source=str(source), source_kind=kind.name, bytes_read=_bytes_on_disk(inputs),
                         params=sum(p.numel() for p in model.state_dict().values()), out=out,
                         out_kind=writer.name, bytes_written=written)


def as_nnopt_model(loaded: Any, input_shape: Sequence[int] | None, source: str) -> Any:
    """An nn.Module that nnopt can save: its own models as they are, Keras models through the
    Keras adapter, plain torch chains through :func:`to_nnopt`."""
    from torch import nn

    from nnopt.io.torch_factory import to_nnopt
    from nnopt.lineage import has_lineage

    if type(loaded).__module__.startswith("onnx"):
        raise UnsupportedModelError(
            f"{source} is an ONNX graph; nnopt does not turn ONNX back into a torch model. "
            "Quantize it with `nnopt quantize-onnx`, or convert from the model's original source"
        )
    if isinstance(loaded, nn.Module) and has_lineage(loaded):
        return loaded
    if type(loaded).__module__.startswith("keras"):
        from nnopt.models import from_keras

        return from_keras(loaded)
    if isinstance(loaded, nn.Module):
        return to_nnopt(loaded, input_shape=input_shape, source=str(source))
    raise UnsupportedModelError(f"{source} gave a {type(loaded).__name__}, not a model nnopt can convert")



def _bytes_on_disk(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


# --- quantize-onnx ---------------------------------------------------------------------------------


def run_quantize_onnx(src: str | Path, out: str | Path, per_channel: bool = True,
                      overwrite: bool = False, weight_type: str = "uint8") -> QuantizeOnnxResult:
    """ONNX Runtime 8-bit dynamic quantization of ``src`` into ``out``, with bytes and output agreement."""
    from nnopt.io.onnx_import import check_onnx_output, load_onnx, onnx_file_bytes, quantize_onnx

    src, out = Path(src), Path(out)
    check_onnx_output(out, [src], overwrite)
    original = load_onnx(src)
    quantize_onnx(src, out, per_channel=per_channel, overwrite=overwrite, weight_type=weight_type)
    diff = max_output_difference(original, load_onnx(out))
    return QuantizeOnnxResult(source=src, out=out, bytes_before=onnx_file_bytes(src),
                              bytes_after=out.stat().st_size, max_abs_diff=diff, per_channel=per_channel,
                              weight_type=weight_type)


def max_output_difference(a: Any, b: Any, batch: int = 2, tokens: int = 8) -> float:
    """Largest |a - b| over all outputs of two ONNX models on the same seeded random inputs.

    Symbolic dimensions are ``batch`` first and ``tokens`` after; float inputs are standard normal,
    integer inputs are ones (a valid token id and attention mask for any vocabulary)."""
    import numpy as np
    import onnxruntime as ort

    try:
        sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (a, b)]
    except Exception as exc:  # ORT's own error types: name the step
        raise UnsupportedModelError(f"ONNX Runtime could not open the model: {exc}"[:500]) from None
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sessions[0].get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if n == 0 else tokens) for n, d in enumerate(i.shape)]
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16 if "float16" in i.type else np.float32)
        elif "int" in i.type:
            feeds[i.name] = np.ones(shape, dtype=np.int32 if "int32" in i.type else np.int64)
        else:
            raise UnsupportedModelError(f"input {i.name!r} has type {i.type}; cannot make random inputs for it")
    try:
        outs = [s.run(None, feeds) for s in sessions]
    except Exception as exc:  # ORT's own error types: name the step
        raise UnsupportedModelError(f"ONNX Runtime failed on random inputs: {exc}"[:500]) from None
    return max((float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if x.size else 0.0)
               for x, y in zip(*outs))

