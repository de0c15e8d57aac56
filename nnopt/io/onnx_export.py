"""ONNX export of nnopt models (fp32 and int8) and ONNX Runtime sessions to run them.

int8 layers export in the forms ONNX Runtime runs with integer kernels:
- dynamic int8 Linear → ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul (→ Add)``, the
  pattern ONNX Runtime fuses into its int8 GEMM with a float epilogue;
- static int8 Linear/Conv2d → QuantizeLinear/DequantizeLinear pairs around the float op (the
  QDQ form), which ONNX Runtime turns into integer operators.

``int8_weights`` picks how the codes are written; the integers are nnopt's either way, so the file
computes what the nnopt model computes:
- ``"uint8"`` (the default, **U8U8**): activations and weights as uint8, each weight code stored as
  code + 128 with zero point 128. Right on every CPU: ONNX Runtime's u8×s8 kernels sum pairs of
  products in saturating 16-bit lanes on x86 CPUs without VNNI (its documentation's advice there is
  U8U8 or reduce_range), while its u8×u8 kernels widen to 16 bits first and never saturate.
- ``"int8"`` (U8S8 dynamic, S8S8 static): about 1.8× faster in ONNX Runtime on a CPU with VNNI (MiniLM,
  docs/cpus.md), wrong on CPUs without it; refused where ONNX Runtime's u8×s8 MatMulInteger or S8S8 QDQ
  MatMul failed its known-answer check (:mod:`nnopt.io.onnx_checks`; MatMul stands for Conv too).
- ``"auto"``: ``"int8"`` where that check passed on this machine, else ``"uint8"``: for a file timed and
  used here (``nnopt bench --backend onnxruntime``), not one copied to other machines.

Uses the TorchScript-based exporter (``dynamo=False``): its symbolic functions are what lets a
layer choose its own ONNX nodes. onnx and onnxruntime are the ``onnx`` extra, imported lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import ConfigError, UnsupportedModelError

OPSET = 17
INT8_WEIGHTS = ("uint8", "int8", "auto")
_WEIGHTS: contextvars.ContextVar[str] = contextvars.ContextVar("nnopt_onnx_int8_weights", default="uint8")


class _DynamicInt8LinearFn(torch.autograd.Function):
    """Carries a dynamic int8 Linear through tracing; ``symbolic`` gives its ONNX nodes."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight_t: torch.Tensor, weight_step: torch.Tensor, bias: torch.Tensor,
        smoothing: torch.Tensor | None,
    ) -> torch.Tensor:
        # Only shape and dtype matter here: the exported graph comes from ``symbolic``.
        x = x if smoothing is None else x * smoothing
        return torch.nn.functional.linear(x, _weight_values(weight_t.t(), x.dtype) * weight_step[:, None], bias)

    @staticmethod
    def symbolic(g: Any, x: Any, weight_t: Any, weight_step: Any, bias: Any, smoothing: Any) -> Any:
        if not _is_none(smoothing):
            x = g.op("Mul", x, smoothing)
        x_q, x_step, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        if _WEIGHTS.get() == "uint8":
            w_zero = g.op("Constant", value_t=torch.tensor(WEIGHT_ZERO_U8, dtype=torch.uint8))
            acc = g.op("MatMulInteger", x_q, weight_t, x_zero, w_zero)
        else:
            acc = g.op("MatMulInteger", x_q, weight_t, x_zero)
        out = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", x_step, weight_step))  # to_i=1: FLOAT
        return g.op("Add", out, bias)


def _is_none(value: Any) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def dynamic_int8_linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """What ``Int8DynamicLinear.forward`` returns during export."""
    bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
    smoothing = _constant(module.input_smoothing) if module.smoothing else None
    weight_t = _constant(_export_codes(module.weight_q).t())  # (in, out) as MatMulInteger wants
    out = _DynamicInt8LinearFn.apply(x, weight_t, _constant(module.weight_step), _constant(bias), smoothing)
    return torch.nn.functional.gelu(out) if module.activation == "gelu" else out


class _StaticInt8Fn(torch.autograd.Function):
    """Carries a static int8 Linear/Conv2d through tracing; ``symbolic`` emits the QDQ form."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight_q: torch.Tensor, weight_step: torch.Tensor, bias: torch.Tensor,
        x_step: torch.Tensor, x_zero: torch.Tensor, conv: tuple[Any, ...] | None,
    ) -> torch.Tensor:
        weight = _weight_values(weight_q, x.dtype) * weight_step.view((-1,) + (1,) * (weight_q.ndim - 1))
        if conv is None:
            return torch.nn.functional.linear(x, weight, bias)
        return torch.nn.functional.conv2d(x, weight, bias, *conv)

    @staticmethod
    def symbolic(
        g: Any, x: Any, weight_q: Any, weight_step: Any, bias: Any, x_step: Any, x_zero: Any, conv: Any
    ) -> Any:
        x = g.op("DequantizeLinear", g.op("QuantizeLinear", x, x_step, x_zero), x_step, x_zero)
        if _WEIGHTS.get() == "uint8":
            w_zero = g.op("Constant", value_t=torch.full((_static_dim(weight_q),), WEIGHT_ZERO_U8, dtype=torch.uint8))
        else:
            w_zero = g.op("Constant", value_t=torch.zeros(_static_dim(weight_q), dtype=torch.int8))
        weight = g.op("DequantizeLinear", weight_q, weight_step, w_zero, axis_i=0)
        if conv is None:
            return g.op("Add", g.op("MatMul", x, g.op("Transpose", weight, perm_i=[1, 0])), bias)
        stride, padding, dilation = conv
        return g.op(
            "Conv", x, weight, bias, strides_i=list(stride), pads_i=list(padding) * 2, dilations_i=list(dilation)
        )


def _static_dim(value: Any) -> int:
    return int(value.type().sizes()[0])


def static_int8(module: Any, x: torch.Tensor) -> torch.Tensor:
    """What static int8 layers return during export: float ops between QDQ pairs, U8U8 (module docstring)."""
    bias = module.bias if module.bias is not None else torch.zeros(module.weight_q.shape[0])
    x_step = torch.tensor(float(1.0 / module.input_scale))
    conv = (module.stride, module.padding, module.dilation) if module.weight_q.ndim == 4 else None
    if _WEIGHTS.get() == "uint8":
        # uint8 codes = int8 codes + 128 on the same grid: the zero point moves with them
        x_zero = torch.tensor(int(module.input_zero_point) + 128, dtype=torch.uint8)
    else:
        x_zero = torch.tensor(int(module.input_zero_point), dtype=torch.int8)
    return _StaticInt8Fn.apply(
        x, _constant(_export_codes(module.weight_q)), _constant(module.weight_step), _constant(bias), x_step,
        x_zero, conv,
    )


WEIGHT_ZERO_U8 = 128


def weight_codes_u8(weight_q: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 weight codes (−127..127) as uint8 codes with zero point 128 (1..255): same values."""
    return (weight_q.to(torch.int16) + WEIGHT_ZERO_U8).to(torch.uint8)


def _export_codes(weight_q: torch.Tensor) -> torch.Tensor:
    """A layer's weight codes in the form this export writes (``int8_weights``)."""
    return weight_codes_u8(weight_q) if _WEIGHTS.get() == "uint8" else weight_q


def _weight_values(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The integer values of exported weight codes (uint8 ones carry the zero point 128)."""
    values = codes.to(dtype)
    # no subtraction of 0: the tracer pools that constant out of the autograd.Function's block and fails
    return values - WEIGHT_ZERO_U8 if codes.dtype == torch.uint8 else values


def resolve_int8_weights(int8_weights: str, kernels: tuple[str, ...] | None = None,
                         instead: str = "export with int8_weights='uint8' (nnopt convert --int8-weights uint8)") -> str:
    """``"uint8"`` or ``"int8"`` for an export asked for ``int8_weights`` (see the module docstring): int8 only
    where ONNX Runtime's ``kernels`` (default: those int8-weight files run) passed their known-answer checks
    here; ``instead`` is the advice on refusal."""
    if int8_weights not in INT8_WEIGHTS:
        raise ConfigError(f"int8_weights must be one of {', '.join(INT8_WEIGHTS)}, got {int8_weights!r}")
    if int8_weights == "uint8":
        return "uint8"
    from nnopt.io.onnx_checks import SIGNED_KERNELS, check_onnxruntime_kernel, failed_checks

    kernels = SIGNED_KERNELS if kernels is None else kernels
    if int8_weights == "auto":
        return "int8" if all(check_onnxruntime_kernel(name).passed for name in kernels) else "uint8"
    failed = failed_checks(kernels)
    if failed:
        raise UnsupportedModelError(
            f"int8 weights give u8×s8 kernels, and ONNX Runtime's {failed[0].kernel} failed its known-answer check "
            f"on this CPU ({failed[0].detail}): the file would compute wrong results here; {instead}")
    return "int8"


def _constant(t: torch.Tensor) -> torch.Tensor:
    """A copy the tracer records as a constant, not as ops on a module's buffers (so no runtime
    reciprocal or dequantization is left in the graph)."""
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor],
    path: str | Path | None = None,
    input_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    external_data: str | None = None,
    int8_weights: str = "uint8",
) -> bytes:
    """Export ``model`` to ONNX (opset 17); returns the bytes and writes them atomically to ``path``.

    ``example_inputs``: one tensor, a tuple, or a mapping of keyword inputs (e.g. ``input_ids``,
    ``attention_mask`` of a transformer encoder). Batch (and sequence, for 2-D integer inputs)
    dimensions are dynamic unless ``dynamic_batch=False``.

    ``external_data``: a file name, relative to ``path``'s directory, that receives the weights
    (tensors of 1 KiB and more) while ``path`` keeps the graph; a name that could land outside
    that directory (absolute, ``..``, a symlink out) is refused. The returned bytes hold everything.

    ``int8_weights`` (``"uint8"``, ``"int8"`` or ``"auto"``): how int8 layers write their codes; the default
    U8U8 form is right on every CPU (module docstring).
    """
    onnx = _require("onnx")
    weights = resolve_int8_weights(int8_weights)
    if external_data is not None and path is None:
        raise ConfigError("external_data needs a path to write beside")
    if isinstance(example_inputs, Mapping):
        names = list(input_names or example_inputs.keys())
        args: tuple[Any, ...] = (dict(example_inputs),)
        tensors = list(example_inputs.values())
    else:
        tensors = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
        names = list(input_names or [f"input_{i}" for i in range(len(tensors))])
        args = tuple(tensors)
    dynamic_axes = {}
    if dynamic_batch:
        for name, tensor in zip(names, tensors):
            axes = {0: "batch"}
            if tensor.ndim == 2 and not tensor.is_floating_point():
                axes[1] = "sequence"
            dynamic_axes[name] = axes
        dynamic_axes["output"] = {0: "batch"}
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    export_mode = getattr(model, "onnx_export_mode", None)  # a model's own choice of exportable layers
    token = _WEIGHTS.set(weights)
    try:
        with warnings.catch_warnings(), export_mode() if callable(export_mode) else contextlib.nullcontext():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
            torch.onnx.export(
                model, args, buffer, dynamo=False, opset_version=OPSET, input_names=names, output_names=["output"],
                dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; name the model and the cause
        raise UnsupportedModelError(f"ONNX export of {type(model).__name__} failed: {exc}") from None
    finally:
        _WEIGHTS.reset(token)
        model.train(was_training)
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    if path is not None and external_data is not None:
        _write_with_external_data(onnx.load_from_string(data), Path(path), external_data)
    elif path is not None:
        from nnopt.io.atomic import atomic_write_bytes

        atomic_write_bytes(Path(path), data)
    return data


EXTERNAL_DATA_MIN_BYTES = 1024  # smaller tensors stay in the graph, as onnx's own saver does


def _write_with_external_data(model: Any, path: Path, location: str) -> None:
    """Move large tensors into ``location`` (checked to stay beside ``path``), then write both files
    atomically: the data first, so the graph never names a missing or partial file."""
    from onnx.external_data_helper import set_external_data

    from nnopt.errors import OutputError, UnsafeFileError
    from nnopt.io.atomic import atomic_write_bytes
    from nnopt.io.onnx_import import confined_location, iter_tensors

    try:
        target = confined_location(path.parent, location, f"writing {path}")
    except UnsafeFileError as exc:
        raise OutputError(str(exc)) from None
    if target == path.resolve():
        raise OutputError(f"external_data {location!r} is the model file {path} itself")
    if target.is_dir():
        raise OutputError(f"refusing to write external data to {target}: it is a directory")
    if (path.parent / location).is_symlink():
        raise OutputError(f"refusing to write external data through the symbolic link {path.parent / location}")
    if target.exists() and location not in _external_locations(path):
        raise OutputError(f"refusing to overwrite {target}: it is not the external data of an earlier {path}")
    chunks: list[bytes] = []
    offset = 0
    for tensor in iter_tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_MIN_BYTES:
            raw = tensor.raw_data
            set_external_data(tensor, location, offset=offset, length=len(raw))
            tensor.data_location = type(tensor).EXTERNAL
            tensor.ClearField("raw_data")
            chunks.append(raw)
            offset += len(raw)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, b"".join(chunks))
    atomic_write_bytes(path, model.SerializeToString())


def _external_locations(path: Path) -> set[str]:
    """External-data file names an existing ONNX graph at ``path`` refers to (empty if none or unreadable)."""
    if not path.is_file():
        return set()
    import onnx

    from nnopt.io.onnx_import import iter_tensors

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable old graph refers to nothing we may replace
        return set()
    return {entry.value for tensor in iter_tensors(graph) for entry in tensor.external_data if entry.key == "location"}


class OnnxRunner:
    """An ONNX Runtime session on the best available execution provider, called like a model."""

    def __init__(self, model: bytes | str | Path, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns once per unused initializer of exported graphs
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        if isinstance(model, bytes):
            source = model
            proto = _require("onnx").load_from_string(model)
        else:
            from nnopt.io.onnx_import import load_onnx

            # Checked (external data confined to the model's directory, ONNX checker) before any session.
            proto = load_onnx(model)
            source = proto.SerializeToString()
        if "CUDAExecutionProvider" not in providers:
            from nnopt.io.onnx_checks import refuse_wrong_int8

            refuse_wrong_int8(proto, "this ONNX model" if isinstance(model, bytes) else str(model))
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                  for k, v in feeds.items()}
        return torch.from_numpy(self.session.run(None, arrays)[0])


def _require(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UnsupportedModelError(f"{name} is not installed; pip install 'nnopt[onnx]'") from None
