"""Static int8 of an ONNX graph in ONNX Runtime's QDQ form, calibrated once, with chosen layers left in float.

ONNX Runtime's quantizer places the QuantizeLinear/DequantizeLinear pairs (around convolutions, the
residual additions, pooling) in the patterns its CPU kernels fuse into integer operators; nnopt
chooses what it is given:
- calibration: ``minmax``, ``percentile`` (clips the rarest outliers) or ``entropy`` (the range whose
  8-bit histogram keeps the KL divergence to the float histogram lowest, TensorRT's method: 2048 histogram
  bins, 128 quantized; ``quantize_static``'s own entropy defaults reduce it to min-max); ranges
  are computed once and cached, so re-quantizing with other layers left in float is cheap;
- weights: per output channel, symmetric; ``int8`` gives u8×s8 kernels, ``uint8`` u8×u8 ones. On an
  x86 CPU without VNNI, ONNX Runtime's u8×s8 kernels sum pairs of products in saturating 16-bit
  lanes (measured here: MobileNetV2's top-1 agreement with fp32 fell from 74% to 59%), so ``auto``
  takes ``int8`` only where nnopt's known-answer check of ONNX Runtime's u8×s8 kernel passed
  on this CPU (:mod:`nnopt.io.onnx_checks`), else ``uint8``;
- ``exclude``: layer (module) names kept in float, e.g. those a sensitivity analysis ranks worst. The
  additions, activations and pooling joined to such a layer stay in float with it
  (:func:`float_region`): left to the quantizer, every residual addition would quantize its tensors, and a
  MobileNetV2 with all 53 layers "in float" still agreed with fp32 on only 89% of held-out crops.
onnxruntime is the ``onnx`` extra, imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnopt.errors import ConfigError, UnsupportedModelError

CALIBRATIONS = ("minmax", "percentile", "entropy")
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128  # TensorRT's histogram and target sizes
WEIGHT_TYPES = ("int8", "uint8", "auto")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat",
                 "Relu", "Clip", "Sigmoid", "HardSigmoid", "Resize", "Reshape", "Flatten", "Transpose", "Squeeze",
                 "Unsqueeze")
LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# activations ONNX Runtime folds into the quantized output of the layer before them (the output takes the
# activation's range: [0, 6] for ReLU6, not the pre-activation's far wider one)
FUSED_ACTIVATIONS = ("Relu", "Clip")


def resolve_weight_type(weights: str) -> str:
    """``int8`` or ``uint8`` for ``weights`` (``auto``: int8 where ONNX Runtime's signed QDQ kernels pass here)."""
    if weights not in WEIGHT_TYPES:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
    if weights != "auto":
        return weights
    from nnopt.io.onnx_checks import check_onnxruntime_kernel

    return "int8" if check_onnxruntime_kernel("onnxruntime-u8s8").passed else "uint8"


def layer_nodes(onnx_bytes: bytes) -> dict[str, str]:
    """ONNX node name of each Conv/Gemm/MatMul by the torch module it came from.

    The exporter keeps a parameter's state-dict name for the node's weight initializer
    (``features.1.conv.0.0.weight``), so the module is that name less ``.weight``. Where the exporter
    renamed the weight (a BatchNorm it folded in), the module comes from the node's scope path, whose
    parts each name a child relative to its parent (``/features/features.1/conv/conv.0/Conv``). A module
    that feeds several nodes (called twice) maps to none of them: excluding it would be ambiguous.
    """
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    names: dict[str, str] = {}
    shared: set[str] = set()
    for node in graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        module = weight[: -len(".weight")] if weight.endswith(".weight") else _scope_module(node.name)
        if not module:
            continue
        if module in names:
            shared.add(module)
        names[module] = node.name
    return {module: node for module, node in names.items() if module not in shared}


def float_region(onnx_bytes: bytes, nodes: Sequence[str]) -> list[str]:
    """``nodes`` and every node that is not a layer (Conv/Gemm/MatMul) joined to one of them, directly or
    through other such nodes: the additions, activations and pooling around a layer kept in float.

    This reaches far along a chain of residual additions: one float layer of a ResNet stage takes every
    addition and ReLU of that stage along (measured correct; it costs conversions, which the fallback's
    timing shows).

    ONNX Runtime's quantizer quantizes each of those nodes' tensors unless the node itself is excluded, so a
    layer excluded alone still reads and writes 8-bit tensors wherever an addition or pooling sits next to it.
    An activation right after an int8 layer stays with that layer: in float, it would leave the layer's
    output quantized over its pre-activation range (measured on MobileNetV2: 4 layers kept in float that
    way agreed with fp32 less than none).
    """
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    producer = {tensor: node for node in graph.node for tensor in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    region = set(nodes)
    queue = [node for node in graph.node if node.name in region]
    while queue:
        node = queue.pop()
        neighbours = [producer[t] for t in node.input if t in producer]
        neighbours += [c for t in node.output for c in consumers.get(t, [])]
        for other in neighbours:
            if other.name and other.name not in region and other.op_type not in LAYER_OPS \
                    and not _after_int8_layer(other, producer, region):
                region.add(other.name)
                queue.append(other)
    return [node.name for node in graph.node if node.name in region]


def keep_float_layers_float(onnx_bytes: bytes, layers: Sequence[str]) -> bytes:
    """The QDQ graph with each named float layer reading its 8-bit input through a per-channel DequantizeLinear.

    ONNX Runtime's WeightBiasQuantization optimizer (1.20 and later, on at every optimization level) rewrites
    any Conv/Gemm whose input comes from a per-tensor DequantizeLinear and whose weight is a float initializer
    into a quantized one, with symmetric *per-tensor* int8 weights: a layer kept in float ran with worse weights
    than int8 per channel (measured on MobileNetV2's first depthwise convolution: held-out agreement 86% with
    it truly in float, 73% as rewritten). The same scale repeated per channel computes the same values and is
    not matched.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    producer = {tensor: node for node in graph.node for tensor in node.output}
    wanted = set(layers)
    nodes: list[Any] = []
    for node in graph.node:
        nodes.append(node)
        if node.name not in wanted or node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        source = producer.get(node.input[0])
        if source is None or source.op_type != "DequantizeLinear" or len(source.input) < 3:
            continue
        scale, zero, weight = (tensors.get(source.input[1]), tensors.get(source.input[2]), tensors.get(node.input[1]))
        if scale is None or zero is None or weight is None or len(scale.dims) > 1 or list(scale.dims) not in ([], [1]):
            continue
        channels = _input_channels(node, list(weight.dims))
        if channels is None:
            continue
        prefix = f"{node.name}_float_input"
        scale_value, zero_value = numpy_helper.to_array(scale), numpy_helper.to_array(zero)
        graph.initializer.extend([  # the per-tensor values repeated per channel: the same computation
            numpy_helper.from_array(np.full(channels, scale_value.item(), scale_value.dtype), f"{prefix}_scale"),
            numpy_helper.from_array(np.full(channels, zero_value.item(), zero_value.dtype), f"{prefix}_zero_point"),
        ])
        nodes.insert(len(nodes) - 1, helper.make_node(  # just before the layer: the order stays topological
            "DequantizeLinear", [source.input[0], f"{prefix}_scale", f"{prefix}_zero_point"], [prefix], name=prefix,
            axis=1))
        node.input[0] = prefix
    if len(nodes) == len(graph.node):
        return onnx_bytes
    del graph.node[:]
    graph.node.extend(nodes)
    return bytes(model.SerializeToString())


def _input_channels(node: Any, weight_shape: list[int]) -> int | None:
    if node.op_type == "Conv" and len(weight_shape) >= 3:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return int(weight_shape[1] * group)
    if node.op_type == "ConvTranspose" and len(weight_shape) >= 3:
        return int(weight_shape[0])  # its weight is (C_in, C_out / group, k...)
    if node.op_type == "Gemm" and len(weight_shape) == 2:
        if next((a.i for a in node.attribute if a.name == "transA"), 0):
            return None  # input axis 1 is then not the channel axis
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(weight_shape[1] if trans_b else weight_shape[0])
    return None  # MatMul: the input's channel axis is its last, and WeightBiasQuantization leaves MatMul alone


def _after_int8_layer(node: Any, producer: Mapping[str, Any], region: set[str]) -> bool:
    if node.op_type not in FUSED_ACTIVATIONS or not node.input or node.input[0] not in producer:
        return False
    before = producer[node.input[0]]
    return before.op_type in LAYER_OPS and before.name not in region


def _scope_module(node_name: str) -> str:
    parts = [p for p in node_name.split("/") if p][:-1]  # the last part is the op's own name
    full, previous = "", ""
    for part in parts:
        if previous and part.startswith(previous + "."):
            full += part[len(previous):]  # "conv.0" after "conv": the child "0" of conv
        else:
            full = f"{full}.{part}" if full else part  # an attribute of the module so far
        previous = part
    return full


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over a list of input arrays."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._feeds = [{input_name: b} for b in batches]
        self._next = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


class QdqQuantizer:
    """Quantizes one float ONNX graph many times (different ``exclude`` sets), calibrating once.

    >>> quantizer = QdqQuantizer(fp32_bytes, calibration_batches, method="minmax")  # doctest: +SKIP
    >>> int8_bytes = quantizer.quantize(exclude=("features.0.0",))                    # doctest: +SKIP
    """

    def __init__(self, fp32_onnx: bytes, batches: Sequence[np.ndarray], method: str = "minmax",
                 weights: str = "auto", percentile: float = 99.999) -> None:
        if method not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {method!r}")
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile must lie in (0, 100], got {percentile}")
        if not batches:
            raise ConfigError("static int8 needs calibration inputs; got none")
        self.method = method
        self.weights = resolve_weight_type(weights)
        self.percentile = percentile
        self.nodes = layer_nodes(fp32_onnx)
        self._dir = tempfile.TemporaryDirectory(prefix="nnopt-qdq-")
        self._fp32 = Path(self._dir.name) / "fp32.onnx"
        self._original = fp32_onnx
        self._fp32.write_bytes(fp32_onnx)
        self._cache = Path(self._dir.name) / "calibration.json"
        self._input = _single_input(fp32_onnx)
        self._batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        if method == "entropy":  # quantize_static cannot pass the histogram sizes entropy needs: calibrate here
            self._calibrate_entropy()
        # calibrates and fills the cache; the all-int8 graph it writes is kept (quantize() with nothing excluded)
        self._all_int8 = self._quantize(exclude=(), reader=_Batches(self._input, self._batches))

    def close(self) -> None:
        self._dir.cleanup()

    def _calibrate_entropy(self) -> None:
        """ONNX Runtime's entropy calibrator, with the histogram sizes of TensorRT's method, into the cache.

        ``quantize_static`` builds it with 128 histogram bins and 128 quantized bins, which leaves one candidate
        threshold, the full range: its "entropy" is min-max (measured: the same file, byte for byte). With 2048
        bins the KL search has 961 thresholds to choose from.
        """
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        calibrator = create_calibrator(
            self._fp32, augmented_model_path=str(Path(self._dir.name) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
        )
        with _quiet_onnxruntime(), contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            calibrator.collect_data(_Batches(self._input, self._batches))
            save_tensors_data(calibrator.compute_data(), self._cache)

    def __enter__(self) -> QdqQuantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def quantize(self, exclude: Sequence[str] = (), fp32_onnx: bytes | None = None) -> bytes:
        """The QDQ graph with the named layers (torch module names) left in float.

        ``fp32_onnx``: another float graph of the same structure (e.g. other bias values) to quantize
        with the cached calibration, instead of the one given at construction.
        """
        unknown = [name for name in exclude if name not in self.nodes]
        if unknown:
            raise ConfigError(f"no Conv/Gemm/MatMul node comes from layer(s) {', '.join(unknown)}")
        if fp32_onnx is not None and set(layer_nodes(fp32_onnx).items()) != set(self.nodes.items()):
            raise ConfigError("fp32_onnx must have the same layers and node names as the calibrated graph")
        if not exclude and fp32_onnx is None:
            return self._all_int8  # written while calibrating: the same graph, not quantized again
        self._fp32.write_bytes(self._original if fp32_onnx is None else fp32_onnx)
        return self._quantize(exclude, reader=None)

    def _quantize(self, exclude: Sequence[str], reader: _Batches | None) -> bytes:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.method]
        out = Path(self._dir.name) / "int8.onnx"
        extra = {"WeightSymmetric": True, "CalibPercentile": self.percentile}
        float_layers = [self.nodes[name] for name in exclude]
        try:
            with _quiet_onnxruntime():
                quantize_static(
                    str(self._fp32), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if self.weights == "int8" else QuantType.QUInt8,
                    nodes_to_exclude=float_region(self._fp32.read_bytes(), float_layers), calibrate_method=method,
                    extra_options=extra, calibration_cache_path=str(self._cache),
                )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UnsupportedModelError(f"ONNX Runtime's static quantization failed: {exc}"[:500]) from None
        return keep_float_layers_float(out.read_bytes(), float_layers)


def _single_input(onnx_bytes: bytes) -> str:
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"static int8 of an ONNX graph takes one input (an image batch); it has {inputs}")
    return str(inputs[0])


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice and per-initializer warnings through ``logging`` and its C++ logger."""
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        onnxruntime.set_default_logger_severity(2)  # ONNX Runtime's default (warnings); it has no getter


def run_onnx(onnx_bytes: bytes, inputs: np.ndarray, threads: int | None = None, batch: int = 64) -> np.ndarray:
    """Outputs of an ONNX graph on ``inputs`` in batches, on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])


def weight_type_facts(weights: str) -> Mapping[str, Any]:
    """What a report says about the weight codes chosen."""
    kernels = "u8×s8 (VNNI-safe)" if weights == "int8" else "u8×u8 (no 16-bit saturation on CPUs without VNNI)"
    return {"weights": weights, "kernels": kernels}
