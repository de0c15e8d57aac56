"""ONNX Runtime's int8 kernels under the known-answer check (:mod:`nnopt.kernel_check`).

- ``onnxruntime-u8s8`` / ``onnxruntime-u8u8``: MatMulInteger with int8 or uint8 (zero point 128) weights;
- ``onnxruntime-qdq-u8u8`` / ``onnxruntime-qdq-s8s8``: the QDQ MatMul of nnopt's static int8 exports (U8U8
  by default, S8S8 with ``int8_weights="int8"``), float output.

Sessions use ORT_ENABLE_ALL, so the fused kernels users get are the ones checked.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from nnopt.errors import UnsupportedModelError
from nnopt.kernel_check import KernelCheck, KernelSpec, checked


def _ort_matmul_integer(weights: str) -> Any:
    def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from onnx import TensorProto, helper, numpy_helper

        b = w.t().numpy().astype(np.int8) if weights == "s8" else (w.t().numpy() + 128).astype(np.uint8)
        b_zero = np.array(0 if weights == "s8" else 128, dtype=b.dtype)
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])], "check",
            [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, x.shape[1]])],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, w.shape[0]])],
            [numpy_helper.from_array(b, "B"), numpy_helper.from_array(np.array(0, np.uint8), "a_zero"),
             numpy_helper.from_array(b_zero, "b_zero")])
        return torch.from_numpy(_run(graph, x.numpy().astype(np.uint8)))

    return gemm


def _ort_qdq(signed: bool) -> Any:
    """The static export's QDQ form: Q/DQ activations, DQ per-channel weights, MatMul, float output; U8U8
    (uint8 weights with zero point 128) or S8S8 (``int8_weights="int8"``)."""

    def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_run(_qdq_graph(x.shape[1], w, signed), x.numpy().astype(np.float32)))

    return gemm


def _qdq_graph(k: int, w: torch.Tensor, signed: bool) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    n = w.shape[0]
    codes = w.t().numpy().astype(np.int8) if signed else (w.t().numpy() + 128).astype(np.uint8)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "x_step"),
             numpy_helper.from_array(np.array(0, np.int8 if signed else np.uint8), "x_zero"),
             numpy_helper.from_array(codes, "w_q"),
             numpy_helper.from_array(np.ones(n, np.float32), "w_step"),
             numpy_helper.from_array(np.full(n, 0 if signed else 128, codes.dtype), "w_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["X", "x_step", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_step", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_step", "w_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["Y"])]
    return helper.make_graph(nodes, "check", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
                             [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)


def _run(graph: Any, feed: Any) -> Any:
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR version: read by every onnxruntime nnopt supports (>= 1.17)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})[0]


def _unavailable() -> str | None:
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return "onnxruntime is not installed (pip install 'nnopt[onnx]')"
    return None


ONNXRUNTIME_KERNELS: dict[str, KernelSpec] = {
    "onnxruntime-u8s8": KernelSpec(_ort_matmul_integer("s8"), (0, 255), _unavailable),
    "onnxruntime-u8u8": KernelSpec(_ort_matmul_integer("u8"), (0, 255), _unavailable),
    "onnxruntime-qdq-u8u8": KernelSpec(_ort_qdq(signed=False), (0, 255), _unavailable),
    "onnxruntime-qdq-s8s8": KernelSpec(_ort_qdq(signed=True), (-128, 127), _unavailable),
}


def check_onnxruntime_kernel(name: str) -> KernelCheck:
    """The verdict on ONNX Runtime kernel ``name`` in this process."""
    return checked(name, ONNXRUNTIME_KERNELS[name])


def failed_checks(kernels: tuple[str, ...]) -> list[KernelCheck]:
    """The verdicts among ``kernels`` that found the kernel wrong here (not those merely unavailable)."""
    return [check for check in map(check_onnxruntime_kernel, kernels) if check.passed is False]


# Where an operator reads integer weight codes: ONNX Runtime multiplies them as u8×s8 when they are int8.
WEIGHT_CODE_INPUTS = {"MatMulInteger": 1, "ConvInteger": 1, "QLinearMatMul": 3, "QLinearConv": 3, "DequantizeLinear": 0}
# What int8-weight files run: U8S8 MatMulInteger and S8S8 QDQ (the MatMul check stands for Conv too).
SIGNED_KERNELS = ("onnxruntime-u8s8", "onnxruntime-qdq-s8s8")


def signed_int8_weights(model: Any) -> list[str]:
    """The nodes of ``model`` (an onnx ModelProto) that read int8 weight codes (initializers or Constants)."""
    from onnx import TensorProto

    graph = model.graph
    int8 = {t.name for t in graph.initializer if t.data_type == TensorProto.INT8}
    int8 |= {node.output[0] for node in graph.node if node.op_type == "Constant" and node.attribute
             and node.attribute[0].HasField("t") and node.attribute[0].t.data_type == TensorProto.INT8}
    found = []
    for node in graph.node:
        index = WEIGHT_CODE_INPUTS.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in int8:
            found.append(f"{node.op_type} {node.name or node.output[0]!r}")
    return found


def refuse_wrong_int8(model: Any, what: str) -> None:
    """Refuse to run ``model`` on ONNX Runtime's CPU kernels where its int8 weights would give wrong results
    here: u8×s8 kernels that failed their known-answer check (a CPU without VNNI). Files with uint8 (U8U8)
    weights, or no int8 weights, pass without running a check."""
    found = signed_int8_weights(model)
    if not found:
        return
    failed = failed_checks(SIGNED_KERNELS)
    if failed:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise UnsupportedModelError(
            f"{what} multiplies int8 weights ({found[0]}{more}), which ONNX Runtime computes wrongly on this CPU "
            f"({failed[0].kernel} failed its known-answer check: no VNNI?); write it with uint8 weights instead "
            "(nnopt convert --int8-weights uint8, or nnopt quantize-onnx --weight-type uint8)")
