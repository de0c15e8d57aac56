"""OpenVINO: ONNX models (fp32, or int8 in the QDQ form) converted to OpenVINO, written as IR, and run.

- :func:`convert_onnx` turns an ONNX file or its bytes into an ``openvino.Model``
  (``openvino.convert_model``); a file is read with :func:`nnopt.io.onnx_import.load_onnx` first, so its
  external data is checked to stay beside it, as for ONNX Runtime.
- :func:`write_openvino` writes the deployable IR: ``NAME.xml`` (the graph) and ``NAME.bin`` (the
  weights, found by OpenVINO beside the .xml under the same stem). Weights stay float32 unless asked
  (``openvino.save_model`` would halve them to fp16 by default, which changes the outputs). Each file
  is written atomically, the .bin first, so a new graph never pairs with missing weights.
- :class:`OpenVinoRunner` compiles a model for the CPU with a thread count (``INFERENCE_NUM_THREADS``),
  a latency or throughput hint and float32 inference precision (OpenVINO would otherwise pick bf16 on
  CPUs that have it), and is called like a model: torch tensors or NumPy arrays in, a torch tensor out.

int8: OpenVINO's CPU plugin multiplies int8 weight codes with u8×s8 instructions that sum pairs of
products in saturating 16-bit lanes on x86 CPUs without VNNI (measured here, AMD EPYC AVX2: off by
288,032 on a product of 582,930), as ONNX Runtime does. A known-answer check (:mod:`nnopt.kernel_check`)
runs OpenVINO's QDQ MatMul with extreme codes once per process when a model holds int8 weight
constants, and :class:`OpenVinoRunner` refuses such a model where the check failed; uint8 weights with
zero point 128 (nnopt's default U8U8 export) were exact there. On an AMD EPYC with AVX-512 VNNI it was the other
way round: signed weights exact, uint8 weights (zero point 128) off by 3,221 on extreme codes. So uint8 weight
codes are checked the same way (``openvino-qdq-u8u8``), and a model holding them is refused where that fails.

OpenVINO is the ``openvino`` extra, imported lazily; without it every entry point raises
:class:`~nnopt.errors.UnsupportedModelError` naming ``pip install 'nnopt[openvino]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnopt.errors import ConfigError, ModelFormatError, OutputError, UnsupportedModelError

OPENVINO_FIX = "pip install 'nnopt[openvino]'"
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
PRECISIONS = ("f32", "bf16", "f16")


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str | None:
    """OpenVINO's version string; None when it is not installed."""
    if not openvino_available():
        return None
    return str(_openvino().__version__)


def _openvino() -> Any:
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise UnsupportedModelError(f"openvino is not installed; {OPENVINO_FIX}") from None


def _onnx_bytes(onnx: bytes | str | Path) -> tuple[bytes, str]:
    """The serialized ONNX model and a name for messages; a file goes through the ONNX checks."""
    if isinstance(onnx, (bytes, bytearray)):
        return bytes(onnx), "this ONNX model"
    path = Path(onnx)
    try:
        from nnopt.io.onnx_import import load_onnx
    except ImportError:  # pragma: no cover - onnx_import imports onnx lazily itself
        raise UnsupportedModelError("reading ONNX files needs onnx; pip install 'nnopt[onnx]'") from None
    return load_onnx(path).SerializeToString(), str(path)


def convert_onnx(onnx: bytes | str | Path) -> Any:
    """An ``openvino.Model`` from ONNX bytes or an ``.onnx`` file (QDQ int8 files included).

    >>> model = convert_onnx("model.onnx")  # doctest: +SKIP
    """
    ov = _openvino()
    data, name = _onnx_bytes(onnx)
    try:
        return ov.convert_model(io.BytesIO(data))
    except Exception as exc:  # the frontends raise many types; name the model and the cause
        raise UnsupportedModelError(f"OpenVINO could not convert {name}: {str(exc).strip()[:400]}") from None


def write_openvino(onnx: bytes | str | Path | Any, out_xml: str | Path, *, compress_to_fp16: bool = False
                   ) -> tuple[Path, Path]:
    """Convert ``onnx`` (bytes, an ``.onnx`` file, or an ``openvino.Model``) and write ``out_xml`` and the
    ``.bin`` beside it atomically; returns both paths.

    >>> xml, weights = write_openvino("model.onnx", "deploy/model.xml")  # doctest: +SKIP
    """
    from nnopt.io.atomic import atomic_write_bytes, refuse_input_overlap

    ov = _openvino()
    out_xml = Path(out_xml)
    if out_xml.suffix.lower() != ".xml":
        raise ConfigError(f"an OpenVINO IR is written as NAME.xml (+ NAME.bin); got {out_xml}")
    if out_xml.is_dir():
        raise OutputError(f"refusing to write {out_xml}: it is a directory")
    out_bin = out_xml.with_suffix(".bin")
    if isinstance(onnx, (str, Path)):
        refuse_input_overlap(out_xml, [Path(onnx)])
        refuse_input_overlap(out_bin, [Path(onnx)])
    model = onnx if isinstance(onnx, ov.Model) else convert_onnx(onnx)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    # save_model writes into a private folder first; the two files then replace the outputs one by one
    with tempfile.TemporaryDirectory(prefix=".nnopt-ov-", dir=out_xml.parent) as tmp:
        staged = Path(tmp) / "model.xml"
        try:
            ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        except Exception as exc:  # noqa: BLE001 - name the output and the cause
            raise OutputError(f"OpenVINO could not write {out_xml}: {str(exc).strip()[:400]}") from None
        weights = staged.with_suffix(".bin")
        atomic_write_bytes(out_bin, weights.read_bytes() if weights.exists() else b"")
        atomic_write_bytes(out_xml, staged.read_bytes())
    return out_xml, out_bin


def read_openvino(path: str | Path) -> Any:
    """An ``openvino.Model`` from an IR ``.xml`` (its ``.bin`` beside it) or an ``.onnx`` file."""
    ov = _openvino()
    path = Path(path)
    if path.suffix.lower() != ".xml":
        return convert_onnx(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such OpenVINO IR file")
    try:
        return ov.Core().read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - name the file and the cause
        raise ModelFormatError(f"{path} is not a readable OpenVINO IR: {str(exc).strip()[:400]}") from None


def _qdq_model(k: int, w: torch.Tensor, act_signed: bool, weight_signed: bool) -> bytes:
    """A QDQ MatMul (step 1, zero points 0 or 128) over activation codes ``(m, k)`` and weight codes ``w``
    ``(n, k)``: the form int8 QDQ files (ONNX Runtime's ``quantize_static``, nnopt's static export) use."""
    from onnx import TensorProto, helper, numpy_helper

    n = w.shape[0]
    codes = w.t().numpy().astype(np.int8) if weight_signed else (w.t().numpy() + 128).astype(np.uint8)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "x_step"),
             numpy_helper.from_array(np.array(0, np.int8 if act_signed else np.uint8), "x_zero"),
             numpy_helper.from_array(codes, "w_q"), numpy_helper.from_array(np.ones(n, np.float32), "w_step"),
             numpy_helper.from_array(np.full(n, 0 if weight_signed else 128, codes.dtype), "w_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["X", "x_step", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_step", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_step", "w_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["Y"])]
    graph = helper.make_graph(nodes, "check", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _ov_qdq(act_signed: bool, weight_signed: bool) -> Any:
    def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ov = _openvino()
        model = ov.convert_model(io.BytesIO(_qdq_model(x.shape[1], w, act_signed, weight_signed)))
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return torch.from_numpy(np.asarray(compiled(x.numpy().astype(np.float32))[0]))

    return gemm


def _check_unavailable() -> str | None:
    if not openvino_available() or importlib.util.find_spec("onnx") is None:
        return f"openvino or onnx is not installed ({OPENVINO_FIX})"
    return None


# Signed int8 weights are what can saturate; uint8 weights (zero point 128) are checked as the safe form.
OPENVINO_KERNELS = {
    "openvino-qdq-u8s8": (False, True, (0, 255)),  # ONNX Runtime quantize_static's default QDQ
    "openvino-qdq-s8s8": (True, True, (-128, 127)),  # nnopt's static export with int8_weights="int8"
    "openvino-qdq-u8u8": (False, False, (0, 255)),  # nnopt's default U8U8 export
}
SIGNED_OPENVINO_KERNELS = ("openvino-qdq-u8s8", "openvino-qdq-s8s8")
UNSIGNED_OPENVINO_KERNELS = ("openvino-qdq-u8u8",)


def check_openvino_kernel(name: str) -> Any:
    """The known-answer verdict (:class:`nnopt.kernel_check.KernelCheck`) on OpenVINO kernel ``name`` here."""
    from nnopt.kernel_check import KernelSpec, checked

    act_signed, weight_signed, activation_range = OPENVINO_KERNELS[name]
    return checked(name, KernelSpec(_ov_qdq(act_signed, weight_signed), activation_range, _check_unavailable))


def int8_weight_constants(model: Any) -> list[str]:
    """Names of the int8 constants of an ``openvino.Model`` (weight codes of a QDQ int8 model)."""
    ov = _openvino()
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]


def uint8_weight_constants(model: Any) -> list[str]:
    """Names of the uint8 weight codes of an ``openvino.Model``: uint8 constants of two or more dimensions (an
    activation's zero point is a scalar, a weight's per-channel zero points one-dimensional)."""
    ov = _openvino()
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.u8
            and len(op.get_output_partial_shape(0)) >= 2]


def refuse_wrong_int8(model: Any, what: str = "this model") -> None:
    """Refuse ``model`` (an ``openvino.Model``) where its 8-bit weights would give wrong results on this CPU:
    OpenVINO's QDQ MatMul with that kind of weight codes failed its known-answer check. Signed codes fail on
    CPUs without VNNI (u8×s8 pairs saturating in 16 bits); uint8 codes with zero point 128 failed on an AMD EPYC
    with AVX-512 VNNI."""
    checks = ((int8_weight_constants(model), SIGNED_OPENVINO_KERNELS, "int8", "uint8 weights (zero point 128)",
               "nnopt convert --int8-weights uint8, or QuantType.QUInt8 weights"),
              (uint8_weight_constants(model), UNSIGNED_OPENVINO_KERNELS, "uint8", "int8 weights",
               "nnopt convert --int8-weights int8, nnopt int8-onnx --weights int8, or QuantType.QInt8 weights"))
    for found, kernels, kind, other, how in checks:
        if not found:
            continue
        failed = [c for c in map(check_openvino_kernel, kernels) if c.passed is False]
        if failed:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise UnsupportedModelError(
                f"{what} holds {kind} weights ({found[0]!r}{more}), which OpenVINO computes wrongly on this CPU "
                f"({failed[0].kernel} failed its known-answer check: {failed[0].detail}); write it with {other} "
                f"instead ({how})")


class OpenVinoRunner:
    """An OpenVINO model compiled for the CPU, called like a model (first output, as a torch tensor).

    ``model``: ONNX bytes, an ``.onnx`` or IR ``.xml`` file, or an ``openvino.Model``. ``threads``:
    ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores). ``hint``: ``"latency"`` (one
    stream that uses every thread for each call: what a single caller, and a timing, sees) or
    ``"throughput"`` (several streams for concurrent callers; one synchronous call then uses a share
    of the threads). ``precision``: the CPU plugin's ``INFERENCE_PRECISION_HINT``; ``"f32"`` computes
    what the file says. ``check_int8``: refuse a model with int8 weights where OpenVINO's signed int8
    kernels failed their known-answer check here (module docstring); False runs it anyway (to measure
    the error).

    >>> runner = OpenVinoRunner("model.onnx", threads=2)  # doctest: +SKIP
    >>> logits = runner(torch.randn(8, 3, 224, 224))  # doctest: +SKIP
    """

    def __init__(self, model: bytes | str | Path | Any, threads: int | None = None, hint: str = "latency",
                 precision: str = "f32", check_int8: bool = True) -> None:
        ov = _openvino()
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if hint not in HINTS:
            raise ConfigError(f"hint must be one of {', '.join(HINTS)}, got {hint!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        what = str(model) if isinstance(model, (str, Path)) else "this model"
        if isinstance(model, (bytes, bytearray)):
            model = convert_onnx(bytes(model))
        elif isinstance(model, (str, Path)):
            model = read_openvino(model)
        if check_int8:
            refuse_wrong_int8(model, what)
        config: dict[str, Any] = {"PERFORMANCE_HINT": HINTS[hint], "INFERENCE_PRECISION_HINT": precision}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - the plugin raises RuntimeError with long messages
            raise UnsupportedModelError(f"OpenVINO could not compile the model for the CPU: "
                                        f"{str(exc).strip()[:400]}") from None
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.threads = threads
        self.hint = hint
        self.precision = precision

    @property
    def provider(self) -> str:
        return "OpenVINO CPU"

    def settings(self) -> dict[str, Any]:
        """The compiled model's own record of its threads, hint, precision and streams."""
        out: dict[str, Any] = {}
        for key in ("INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT", "NUM_STREAMS"):
            try:
                out[key] = str(self.compiled.get_property(key))
            except Exception:  # noqa: BLE001 - a property this plugin version does not report
                out[key] = None
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        feeds: dict[str, Any] = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise ConfigError(f"unknown input {sorted(unknown)[0]!r}; the model takes {', '.join(self.input_names)}")
        arrays = {name: _array(value) for name, value in feeds.items()}
        result = self.request.infer(arrays)  # outputs are copied out of the request's buffers
        return torch.from_numpy(np.asarray(result.to_tuple()[0]))


def _array(value: Any) -> np.ndarray[Any, Any]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


__all__ = ["HINTS", "OPENVINO_FIX", "OPENVINO_KERNELS", "OpenVinoRunner", "check_openvino_kernel", "convert_onnx",
           "int8_weight_constants", "openvino_available", "openvino_version", "read_openvino", "refuse_wrong_int8",
           "uint8_weight_constants", "write_openvino"]
