"""An ONNX Runtime QDQ file run in torch: its own quantization points, differentiable, at other widths.

:class:`QdqSimulation` interprets the int8 graph that ONNX Runtime's quantizer wrote (QuantizeLinear /
DequantizeLinear pairs around convolutions, additions, pooling): every activation is fake-quantized with
the file's own scale and zero point, every weight on its own per-channel grid. On small models it computes what
ONNX Runtime computes from the file with graph optimizations off, within two output steps (tested): float sums
in another order land a few values on the other side of a rounding boundary, as ONNX Runtime's own fused
kernels do, and a deep network amplifies such flips.

What it is for:
- **what-if widths**: ``activation_bits`` / ``weight_bits`` change the width while keeping each tensor's
  calibrated range (``None``: float, activations still clipped to the range). This isolates how much of
  int8's error each part makes (``benchmarks/cnn_fidelity.py``).
- **distillation through the file itself** (:func:`distill_qdq`): the float weights and biases behind the codes
  are trained so that the file's outputs follow the float model's (straight-through rounding), then written
  back as codes into the same graph: what was trained is what ships.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import ConfigError, UnsupportedModelError

SUPPORTED_OPS = ("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Relu", "Clip", "Add", "Mul",
                 "GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape", "Constant", "Identity", "Concat")
_CODE_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
_SYMMETRIC_ZERO = {np.dtype(np.uint8): 128, np.dtype(np.int8): 0}
_SYMMETRIC_RATIO = {np.dtype(np.uint8): 2 / 255, np.dtype(np.int8): 1 / 127}  # scale / |w|max, as ONNX Runtime
_QUANTIZED_SUFFIX = "_quantized"  # ONNX Runtime's quantizer names a weight's codes after the float weight


@dataclasses.dataclass
class _Weight:
    """A weight behind a DequantizeLinear: trained in float, written back as codes."""

    key: str
    codes: str          # the initializer holding the codes
    scale: str          # the initializer holding the scale
    zero: torch.Tensor  # zero point(s), float32, one per channel or one
    axis: int
    factor: torch.Tensor    # scale / |w|max per channel, as the quantizer derived it (symmetric weights)
    original: torch.Tensor  # the file's scale: kept for an all-zero channel, and where only float rounding differs
    low: int
    high: int


@dataclasses.dataclass
class _Bias:
    """An int32 bias behind a DequantizeLinear: its step is the input scale times the weight's scale."""

    key: str
    codes: str
    scale: str
    input_scale: float
    weight_output: str      # the weight's DequantizeLinear output
    original: torch.Tensor  # the file's step


class QdqSimulation(nn.Module):
    """``qdq_onnx`` (an ONNX Runtime QDQ graph) as a torch module; ``float_onnx``: the float graph it was
    quantized from, whose weights start the trainable float weights (where a name does not match, the
    dequantized codes start them). ``activation_bits``/``weight_bits``: 8 is the file's own arithmetic."""

    def __init__(self, qdq_onnx: bytes, float_onnx: bytes | None = None, activation_bits: int | None = 8,
                 weight_bits: int | None = 8) -> None:
        import onnx
        from onnx import numpy_helper

        super().__init__()
        for name, bits in (("activation_bits", activation_bits), ("weight_bits", weight_bits)):
            if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 16):
                raise ConfigError(f"{name} must lie in 2..16 or be None (float), got {bits}")
        self.activation_bits, self.weight_bits = activation_bits, weight_bits
        self._model = onnx.load_from_string(qdq_onnx)
        graph = self._model.graph
        unsupported = sorted({n.op_type for n in graph.node} - set(SUPPORTED_OPS))
        if unsupported:
            raise UnsupportedModelError(f"the QDQ simulation does not run {', '.join(unsupported)} nodes")
        self._consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._tensors = {name: torch.from_numpy(np.array(v, dtype=np.int64 if v.dtype == np.int64 else np.float32))
                         for name, v in self._consts.items()}
        floats = {} if float_onnx is None else {
            t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(float_onnx).graph.initializer}
        self._nodes = list(graph.node)
        self._attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in self._nodes]
        initializers = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(graph.output) < 1:
            raise UnsupportedModelError(f"the QDQ simulation runs graphs with one input; this one has {len(inputs)}")
        self._input, self._output = inputs[0], graph.output[0].name
        self._check_activations()
        self.params = nn.ParameterDict()
        self._weights: dict[str, _Weight] = {}
        self._biases: dict[str, _Bias] = {}
        producer = {tensor: node for node in self._nodes for tensor in node.output}
        for node in self._nodes:
            if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
                continue
            weight_dq = producer.get(node.input[1])
            if weight_dq is None or weight_dq.op_type != "DequantizeLinear" or weight_dq.input[0] not in self._consts:
                continue  # a layer kept in float: its weights stay as they are
            if weight_dq.output[0] not in self._weights:  # a weight two layers share is one parameter
                self._add_weight(weight_dq, floats)
            bias_dq = producer.get(node.input[2]) if len(node.input) > 2 else None
            if bias_dq is not None and bias_dq.op_type == "DequantizeLinear" and bias_dq.input[0] in self._consts \
                    and bias_dq.output[0] not in self._biases:
                source = producer.get(node.input[0])
                if source is None or source.op_type != "DequantizeLinear" or source.input[1] not in self._consts \
                        or self._consts[source.input[1]].size != 1:
                    raise UnsupportedModelError(f"{node.name}: an int32 bias needs a per-tensor quantized input")
                self._add_bias(bias_dq, floats, float(self._consts[source.input[1]].reshape(-1)[0]),
                               weight_dq.output[0])

    def _check_activations(self) -> None:
        """One clear error for what the simulation does not cover, before any work is done."""
        for node in self._nodes:
            if node.op_type != "QuantizeLinear":
                continue
            scale = self._consts.get(node.input[1])
            zero = self._consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scale is None or scale.size != 1:
                raise UnsupportedModelError(f"{node.name}: only per-tensor activation scales are simulated")
            if zero is None or zero.dtype not in _CODE_RANGES:
                kind = "no zero point" if zero is None else f"{zero.dtype} codes"
                raise UnsupportedModelError(f"{node.name}: activations with {kind} are not simulated (uint8/int8)")

    def _add_weight(self, dq: Any, floats: dict[str, np.ndarray]) -> None:
        codes = self._consts[dq.input[0]]
        scale = self._consts[dq.input[1]].astype(np.float64)
        zero = self._consts[dq.input[2]] if len(dq.input) > 2 else np.zeros_like(scale, dtype=codes.dtype)
        per_channel = scale.size > 1
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % codes.ndim if per_channel else 0
        if codes.dtype not in _CODE_RANGES:
            raise UnsupportedModelError(f"weight codes of type {codes.dtype} ({dq.input[0]}) are not simulated")
        shape = [1] * codes.ndim
        if per_channel:
            shape[axis] = -1
        value = floats.get(_float_name(dq.input[0]))
        if value is None or value.shape != codes.shape:
            value = (codes.astype(np.float64) - zero.reshape(shape)) * scale.reshape(shape)
        reduce = tuple(i for i in range(codes.ndim) if not per_channel or i != axis)
        largest = np.atleast_1d(np.abs(value).max(axis=reduce) if per_channel else np.abs(value).max())
        scale = np.atleast_1d(scale).reshape(-1)
        used = largest > 0
        if np.any(np.broadcast_to(np.atleast_1d(zero), used.shape)[used] != _SYMMETRIC_ZERO[codes.dtype]):
            raise UnsupportedModelError(f"{dq.input[0]}: asymmetric weight codes are not simulated (nnopt writes "
                                        "symmetric ones)")  # an all-zero channel may have any zero point
        ratio = float(np.median(scale[used] / largest[used])) if used.any() else _SYMMETRIC_RATIO[codes.dtype]
        factor = np.where(used, scale / np.where(used, largest, 1.0), ratio)  # symmetric: one ratio for all
        key = f"weight{len(self.params)}"
        self.params[key] = nn.Parameter(torch.from_numpy(np.asarray(value, np.float32).copy()))
        low, high = _CODE_RANGES[codes.dtype]
        self._weights[dq.output[0]] = _Weight(
            key, dq.input[0], dq.input[1], torch.from_numpy(np.asarray(zero, np.float32).reshape(-1)), axis,
            torch.from_numpy(factor.astype(np.float32)), torch.from_numpy(scale.astype(np.float32)), low, high)

    def _add_bias(self, dq: Any, floats: dict[str, np.ndarray], input_scale: float, weight_output: str) -> None:
        codes, scale = self._consts[dq.input[0]], self._consts[dq.input[1]]
        value = floats.get(_float_name(dq.input[0]))
        if value is None or value.shape != codes.shape:
            value = codes.astype(np.float64) * scale
        key = f"bias{len(self.params)}"
        self.params[key] = nn.Parameter(torch.from_numpy(np.asarray(value, np.float32).copy()))
        self._biases[dq.output[0]] = _Bias(key, dq.input[0], dq.input[1], input_scale, weight_output,
                                           torch.from_numpy(np.asarray(scale, np.float32).reshape(-1)))

    # ------------------------------------------------------------------ running

    def _weight_scale(self, weight: _Weight) -> torch.Tensor:
        """The scale the quantizer would derive from the current float weight (symmetric: |w|max per channel);
        the file's own where a channel is all zero or only float rounding differs."""
        value: torch.Tensor = self.params[weight.key].detach()
        if weight.factor.numel() == 1:
            largest = value.abs().amax().reshape(1)
        else:
            largest = value.abs().amax(dim=[i for i in range(value.ndim) if i != weight.axis])
        return _kept(torch.where(largest > 0, largest * weight.factor, weight.original), weight.original)

    def _bias_step(self, bias: _Bias) -> torch.Tensor:
        """The bias's int32 step: the input scale times the weight's (current) scale."""
        return _kept(self._weight_scale(self._weights[bias.weight_output]) * bias.input_scale, bias.original)

    def _fake_bias(self, bias: _Bias) -> torch.Tensor:
        step = self._bias_step(bias)
        return _fake_quantize(self.params[bias.key], step, torch.zeros_like(step), -2**31, 2**31 - 1)

    def _grid(self, weight: _Weight, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The weight's scale and zero point, shaped to broadcast along its channel axis, and its code range."""
        scale, zero, low, high = self._weight_scale(weight), weight.zero, weight.low, weight.high
        if bits != 8:  # the same range on a finer or coarser grid, zero point kept in place
            scale, zero, low, high = _rewidth(scale, zero, low, high, bits)
        shape = [1] * self.params[weight.key].ndim
        if scale.numel() > 1:
            shape[weight.axis] = -1
        return scale.reshape(shape), zero.reshape(shape).float(), low, high

    def _fake_weight(self, weight: _Weight) -> torch.Tensor:
        value: torch.Tensor = self.params[weight.key]
        if self.weight_bits is None:
            return value
        return _fake_quantize(value, *self._grid(weight, self.weight_bits))

    def _fake_activation(self, x: torch.Tensor, scale_name: str, zero_name: str) -> torch.Tensor:
        scale, zero = float(self._consts[scale_name].reshape(-1)[0]), self._consts[zero_name].reshape(-1)[0]
        low, high = _CODE_RANGES[zero.dtype]
        if self.activation_bits is None:  # float, but clipped to the calibrated range as the file clips it
            return torch.clamp(x, (low - float(zero)) * scale, (high - float(zero)) * scale)
        if self.activation_bits == 8:
            return torch.fake_quantize_per_tensor_affine(x, scale, int(zero), low, high)
        s, z, lo, hi = _rewidth(torch.tensor([scale]), torch.tensor([int(zero)]), low, high, self.activation_bits)
        return torch.fake_quantize_per_tensor_affine(x, float(s), int(z), lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self._input: x}
        quantized: dict[str, tuple[str, str]] = {}  # QuantizeLinear outputs, already fake-quantized
        for node, attrs in zip(self._nodes, self._attributes):
            out = node.output[0]
            op = node.op_type

            def arg(i: int, node: Any = node) -> torch.Tensor:
                name = node.input[i]
                return env[name] if name in env else self._tensors[name]

            if op == "DequantizeLinear" and out in self._weights:
                env[out] = self._fake_weight(self._weights[out])
            elif op == "DequantizeLinear" and out in self._biases:
                env[out] = self._fake_bias(self._biases[out])
            elif op == "QuantizeLinear":
                env[out] = self._fake_activation(arg(0), node.input[1], node.input[2])
                quantized[out] = (node.input[1], node.input[2])
            elif op == "DequantizeLinear" and node.input[0] in quantized:
                scale_name, zero_name = quantized[node.input[0]]
                if (scale_name, zero_name) == (node.input[1], node.input[2] if len(node.input) > 2 else ""):
                    env[out] = env[node.input[0]]
                else:  # e.g. a float layer's per-channel copy of the scale: back to the codes, then its own
                    codes = _RoundHalfEven.apply(env[node.input[0]] / self._tensors[scale_name]) \
                        + self._tensors[zero_name]
                    env[out] = _dequantize(codes, arg(1), arg(2) if len(node.input) > 2 else None,
                                           attrs.get("axis", 1))
            elif op == "DequantizeLinear":  # codes stored in the file (e.g. a float layer's repeated scale)
                env[out] = _dequantize(arg(0), arg(1), arg(2) if len(node.input) > 2 else None, attrs.get("axis", 1))
            else:
                env[out] = _run_op(op, [arg(i) if name else None for i, name in enumerate(node.input)], attrs)
        return env[self._output]

    # ------------------------------------------------------------------ writing back

    def export(self) -> bytes:
        """The QDQ graph with the current float weights written as codes (scales and bias codes updated)."""
        import onnx
        from onnx import numpy_helper

        if self.weight_bits != 8:
            raise ConfigError("only the file's own 8-bit weights can be written back (weight_bits=8)")
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        initializers = {t.name: t for t in model.graph.initializer}

        def put(name: str, value: np.ndarray) -> None:
            initializers[name].CopyFrom(numpy_helper.from_array(value.astype(self._consts[name].dtype), name))

        with torch.no_grad():
            for weight in self._weights.values():
                scale, zero, low, high = self._grid(weight)
                codes = torch.clamp(torch.round(self.params[weight.key] / scale) + zero, low, high)
                put(weight.codes, codes.numpy())
                put(weight.scale, scale.numpy().reshape(self._consts[weight.scale].shape))
            for bias in self._biases.values():
                step = self._bias_step(bias)
                codes = torch.round(self.params[bias.key].double() / step.double()).clamp(-2**31, 2**31 - 1)
                put(bias.codes, codes.numpy())
                put(bias.scale, step.numpy().reshape(self._consts[bias.scale].shape))
        return bytes(model.SerializeToString())


class _RoundHalfEven(torch.autograd.Function):
    """Rounding to the nearest integer (ties to even, as QuantizeLinear) with a straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear, dividing by the scale as ONNX does, so that the weights simulated are
    the file's codes exactly (torch's fused op multiplies by the inverse, which rounds some ties the other way;
    activations use it for speed: their float sums differ from the runtime's in the last bits anyway).
    The gradient passes straight through inside the range, none outside."""
    codes = torch.clamp(_RoundHalfEven.apply(x / scale) + zero, low, high)
    return (codes - zero) * scale


def _kept(scale: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``original`` where ``scale`` only differs from it by float rounding: an untrained file exports unchanged
    (a scale one ulp off moves values on rounding boundaries, and the network amplifies such flips)."""
    return torch.where(torch.isclose(scale, original, rtol=1e-6, atol=0.0), original, scale)


def _float_name(codes_name: str) -> str:
    return codes_name[: -len(_QUANTIZED_SUFFIX)] if codes_name.endswith(_QUANTIZED_SUFFIX) else codes_name


def _rewidth(scale: torch.Tensor, zero: torch.Tensor, low: int, high: int,
             bits: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The same real range [scale·(low−zero), scale·(high−zero)] on a grid of 2**bits levels."""
    levels = 2 ** bits - 1
    ratio = (high - low) / levels
    new_zero = torch.round((zero.double() - low) / ratio).to(torch.int32)
    return scale * ratio, new_zero, 0, levels


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, axis: int) -> torch.Tensor:
    zero = torch.zeros_like(scale) if zero is None else zero
    if scale.numel() > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (codes.float() - zero.float()) * scale


def _run_op(op: str, args: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    """One float ONNX operator in torch (the ops a QDQ CNN graph holds besides the Q/DQ pairs)."""
    if op == "Constant":
        from onnx import numpy_helper

        return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))
    x = args[0]
    assert x is not None
    if op == "Conv":
        return _conv(x, args, attrs)
    if op == "Gemm":
        a, b = (x.t() if attrs.get("transA", 0) else x), args[1]
        assert b is not None
        y: torch.Tensor = float(attrs.get("alpha", 1.0)) * (a @ (b.t() if attrs.get("transB", 0) else b))
        bias = args[2] if len(args) > 2 else None
        return y if bias is None else y + float(attrs.get("beta", 1.0)) * bias
    if op == "MatMul":
        assert args[1] is not None
        return x @ args[1]
    if op == "Relu":
        return F.relu(x)
    if op == "Clip":
        low = args[1] if len(args) > 1 else None
        high = args[2] if len(args) > 2 else None
        return torch.clamp(x, low, high)
    if op in ("Add", "Mul"):
        assert args[1] is not None
        return x + args[1] if op == "Add" else x * args[1]
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    if op in ("AveragePool", "MaxPool"):
        return _pool(op, x, attrs)
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Reshape":
        assert args[1] is not None
        shape = [int(d) for d in args[1].tolist()]
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
    if op == "Identity":
        return x
    if op == "Concat":
        return torch.cat([a for a in args if a is not None], dim=attrs["axis"])
    raise UnsupportedModelError(f"the QDQ simulation does not run {op} nodes")


def _symmetric_pads(pads: list[int], name: str) -> list[int]:
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        raise UnsupportedModelError(f"{name} with asymmetric padding is not simulated")
    return pads[:half]


def _conv(x: torch.Tensor, args: list[torch.Tensor | None], attrs: dict[str, Any]) -> torch.Tensor:
    weight = args[1]
    assert weight is not None
    dims = weight.ndim - 2
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedModelError("Conv with auto_pad is not simulated")
    pads = _symmetric_pads(list(attrs.get("pads", [0] * 2 * dims)), "Conv")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(dims)
    if conv is None:
        raise UnsupportedModelError(f"Conv over {dims} dimensions is not simulated")
    bias = args[2] if len(args) > 2 else None
    return conv(x, weight, bias, list(attrs.get("strides", [1] * dims)), pads,
                list(attrs.get("dilations", [1] * dims)), attrs.get("group", 1))


def _pool(op: str, x: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    kernel = list(attrs["kernel_shape"])
    dims = len(kernel)
    if dims != 2:
        raise UnsupportedModelError(f"{op} over {dims} dimensions is not simulated")
    pads = _symmetric_pads(list(attrs.get("pads", [0] * 2 * dims)), op)
    strides = list(attrs.get("strides", [1] * dims))
    ceil = bool(attrs.get("ceil_mode", 0))
    if op == "MaxPool":
        return F.max_pool2d(x, kernel, strides, pads, list(attrs.get("dilations", [1] * dims)), ceil)
    return F.avg_pool2d(x, kernel, strides, pads, ceil, count_include_pad=bool(attrs.get("count_include_pad", 0)))


# ------------------------------------------------------------------ distillation through the file


# Adam's learning rate by what is trained: weights move on a far finer scale than biases
DISTILL_LR = {"all": 1e-5, "biases": 1e-4}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """``train``: ``all`` (weights and biases) or ``biases`` (few parameters). Adam at ``lr`` (None: the
    :data:`DISTILL_LR` of ``train``), ``steps`` of ``batch`` random rows; loss: softmax KL from the float model's
    outputs."""

    steps: int = 200
    lr: float | None = None
    batch: int = 16
    train: str = "all"
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return DISTILL_LR[self.train] if self.lr is None else self.lr

    def validate(self) -> None:
        if self.train not in DISTILL_LR:
            raise ConfigError(f"train must be one of {', '.join(DISTILL_LR)}, got {self.train!r}")
        if self.steps < 1 or self.batch < 1 or self.learning_rate <= 0:
            raise ConfigError("distillation needs steps >= 1, batch >= 1 and lr > 0")


def distill_qdq(qdq_onnx: bytes, float_onnx: bytes, inputs: torch.Tensor, teacher: torch.Tensor,
                config: DistillConfig = DistillConfig(),
                progress: Callable[[str], None] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The QDQ file with its float weights (and biases) trained so its outputs follow ``teacher``, the float
    model's outputs on ``inputs``; written back into the same graph (the same speed). Returns the file and
    what the report says (the loss at the start and end, on the training rows)."""
    config.validate()
    if len(inputs) != len(teacher) or len(inputs) < 1:
        raise ConfigError("distill_qdq needs as many teacher outputs as inputs, and at least one")
    simulation = QdqSimulation(qdq_onnx, float_onnx)
    trained = [p for key, p in simulation.params.items() if config.train == "all" or key.startswith("bias")]
    if not trained:
        raise UnsupportedModelError("the QDQ file has no quantized layer to train")
    optimizer = torch.optim.Adam(trained, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    target = teacher.float().log_softmax(-1)
    losses: list[float] = []
    for step in range(1, config.steps + 1):
        rows = torch.randint(0, len(inputs), (min(config.batch, len(inputs)),), generator=generator)
        loss = F.kl_div(simulation(inputs[rows]).log_softmax(-1), target[rows], log_target=True,
                        reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress and (step % 20 == 0 or step == config.steps):
            progress(f"distilling the int8 file: step {step}/{config.steps}, KL {np.mean(losses[-20:]):.4f}")
    window = max(1, min(20, config.steps // 4))
    summary = {"steps": config.steps, "lr": config.learning_rate, "batch": config.batch, "train": config.train,
               "rows": len(inputs), "parameters": sum(p.numel() for p in trained),
               "kl_first_steps": float(np.mean(losses[:window])), "kl_last_steps": float(np.mean(losses[-window:])),
               "method": "measured: softmax KL of the simulated file from the float outputs on the training rows"}
    return simulation.export(), summary
