"""Recurrent layers (``nn.LSTM``, ``nn.GRU``) with compressed weights.

- :class:`Int8DynamicRNN`: every weight matrix as symmetric int8 codes per output row (gate unit), with
  activations quantized per call where fbgemm's dynamic int8 LSTM/GRU kernel runs
  (``torch.quantized_lstm`` / ``torch.quantized_gru``). Which of that kernel and the float recurrence
  over the dequantized weights runs is decided once per process and layer shape, by timing both side by
  side on this machine (the int8 kernel must also agree with the float one: SQNR ≥ :data:`MIN_KERNEL_SQNR_DB`);
  on CPUs where fbgemm's kernel is slower (AVX2-only, measured) the float path runs and the layer is only
  smaller, not faster.
- :class:`RecurrentParts`: an LSTM/GRU whose weight matrices are child modules holding codes (weight-only
  quantization) or codebook indices (clustering); each call rebuilds the float weights.

Both compute exactly what ``nn.LSTM``/``nn.GRU`` compute with those weights (same gates, bias, dropout,
directions, ``batch_first``, unbatched inputs); ``proj_size`` and packed sequences are refused.
A recurrent layer holds several matrices, so ``dense_weight``/``weight_codes`` (the compressed-layer
protocol) return them flattened and concatenated in the layer's ``_flat_weights`` order.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from nnopt.errors import ModelFormatError, UnsupportedModelError
from nnopt.layers import primitives as P
from nnopt.layers.protocol import KernelCost, own_bytes, recurrent_macs

RNN_TYPES: dict[type[nn.Module], str] = {nn.LSTM: "LSTM", nn.GRU: "GRU"}
GATES = {"LSTM": 4, "GRU": 3}
MIN_KERNEL_SQNR_DB = 25.0  # fbgemm quantizes activations to 7 bits (reduce_range); 33 dB measured on random LSTMs
_TIMING_BATCH, _TIMING_STEPS = 16, 16


@dataclasses.dataclass(frozen=True)
class RNNShape:
    """What an ``nn.LSTM``/``nn.GRU`` computes besides its weights."""

    mode: str
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool

    @classmethod
    def of(cls, source: nn.Module) -> RNNShape:
        mode = RNN_TYPES.get(type(source))
        if mode is None:
            raise UnsupportedModelError(f"{type(source).__name__} is not an nn.LSTM or nn.GRU")
        rnn: Any = source
        if getattr(rnn, "proj_size", 0):
            raise UnsupportedModelError("LSTM with proj_size > 0 is not supported")
        return cls(mode, int(rnn.input_size), int(rnn.hidden_size), int(rnn.num_layers), bool(rnn.bias),
                   bool(rnn.batch_first), float(rnn.dropout), bool(rnn.bidirectional))

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def flat_names(self) -> list[str]:
        """Parameter names in torch's ``_flat_weights`` order (per layer and direction: w_ih, w_hh, b_ih, b_hh)."""
        names = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[: self.directions]:
                kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if self.bias else ("weight_ih", "weight_hh")
                names += [f"{kind}_l{layer}{suffix}" for kind in kinds]
        return names

    def weight_names(self) -> list[str]:
        return [n for n in self.flat_names() if n.startswith("weight")]

    def macs(self, output: torch.Tensor) -> int:
        """Multiply-accumulates of a call whose output is (…, steps, directions · hidden)."""
        steps = output.numel() // (self.directions * self.hidden_size)
        per_step = 0
        for layer in range(self.num_layers):
            inputs = self.input_size if layer == 0 else self.hidden_size * self.directions
            per_step += GATES[self.mode] * self.hidden_size * (inputs + self.hidden_size) * self.directions
        return steps * per_step

    def describe(self) -> str:
        extra = ", bidirectional" if self.bidirectional else ""
        return f"{self.mode}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}{extra})"


def _hidden(shape: RNNShape, x: torch.Tensor, hx: Any) -> Any:
    if hx is not None:
        return hx
    batch = x.shape[0 if shape.batch_first else 1]
    zeros = torch.zeros(shape.num_layers * shape.directions, batch, shape.hidden_size, dtype=x.dtype, device=x.device)
    return (zeros, zeros) if shape.mode == "LSTM" else zeros


def run_rnn(
    shape: RNNShape, x: torch.Tensor, hx: Any, flat: Sequence[torch.Tensor], training: bool,
    kernel: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None,
) -> tuple[torch.Tensor, Any]:
    """``nn.LSTM``/``nn.GRU``'s forward with the flat weights ``flat`` (or ``kernel(x, hx)`` for a batched
    input with its initial state); unbatched inputs (steps, features) as torch accepts them."""
    if isinstance(x, PackedSequence):
        raise UnsupportedModelError(f"compressed {shape.mode} layers do not take packed sequences; pass padded tensors")
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0 if shape.batch_first else 1)
        if hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    hx = _hidden(shape, x, hx)
    if kernel is not None:
        out, hidden = kernel(x, hx)
    elif shape.mode == "LSTM":
        out, h, c = torch._VF.lstm(x, hx, list(flat), shape.bias, shape.num_layers, shape.dropout, training,
                                   shape.bidirectional, shape.batch_first)
        hidden = (h, c)
    else:
        out, hidden = torch._VF.gru(x, hx, list(flat), shape.bias, shape.num_layers, shape.dropout, training,
                                    shape.bidirectional, shape.batch_first)
    if unbatched:
        out = out.squeeze(0 if shape.batch_first else 1)
        hidden = tuple(h.squeeze(1) for h in hidden) if isinstance(hidden, tuple) else hidden.squeeze(1)
    return out, hidden


class _Cache:
    """Derived tensors (packed kernel weights, dequantized weights); copies and pickles start empty."""

    def __init__(self) -> None:
        self.key: Any = None
        self.value: Any = None

    def clear(self) -> None:
        self.key = self.value = None

    def __deepcopy__(self, memo: dict[int, object]) -> _Cache:
        return _Cache()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Cache, ())


# --------------------------------------------------------------------------- weight-only and clustered parts


class RecurrentParts(nn.Module):
    """An LSTM/GRU whose weight matrices are child modules with a ``dense_weight()`` (quantized codes or a
    codebook), named as the source's parameters (``weight_ih_l0``, ...); biases stay float parameters."""

    def __init__(self, source: nn.Module, parts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.shape = RNNShape.of(source)
        missing = set(self.shape.weight_names()) ^ set(parts)
        if missing:
            raise ValueError(f"recurrent parts must be exactly the weight matrices; mismatched: {sorted(missing)}")
        for name in self.shape.flat_names():
            if name in parts:
                self.add_module(name, parts[name])
            else:
                self.register_parameter(name, nn.Parameter(getattr(source, name).detach().clone()))

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        flat = [getattr(self, n).dense_weight() if n.startswith("weight") else getattr(self, n)
                for n in self.shape.flat_names()]
        return run_rnn(self.shape, x, hx, flat, self.training)

    def composite_macs(self, output: Any, args: Sequence[Any]) -> int:
        """MACs of one call, as the dense LSTM/GRU it stands for (see :func:`recurrent_macs`)."""
        weights = sum(getattr(self, n).dense_weight().numel() for n in self.shape.weight_names())
        return recurrent_macs(weights, output)

    def extra_repr(self) -> str:
        return self.shape.describe()


# --------------------------------------------------------------------------- dynamic int8


class Int8DynamicRNN(nn.Module):
    """An LSTM/GRU with int8 weights per output row (``{name}_q`` int8, ``{name}_scale`` float32 codes per
    unit), run by fbgemm's dynamic int8 kernel where it timed faster here, else by the float recurrence."""

    weight_storage = "int8"
    keras_layer = None

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.shape = RNNShape.of(source)
        for name in self.shape.flat_names():
            tensor = getattr(source, name)
            if name.startswith("weight"):
                self.register_buffer(f"{name}_q", torch.zeros(tensor.shape, dtype=torch.int8))
                self.register_buffer(f"{name}_scale", torch.ones(tensor.shape[0], dtype=torch.float32))
            else:
                self.register_parameter(name, nn.Parameter(tensor.detach().clone(), requires_grad=False))
        self._packed, self._dense = _Cache(), _Cache()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_caches())

    # -- storage -----------------------------------------------------------------------------------

    def set_weights(self, source: nn.Module) -> None:
        """Quantize every weight matrix of ``source`` (an LSTM/GRU of this shape) per output row."""
        for name in self.shape.weight_names():
            weight = getattr(source, name).detach()
            scale, _ = P.compute_qparams(weight, 8, symmetric=True, channel_axis=0)
            getattr(self, f"{name}_q").copy_(P.quantize(weight, scale, 0, 8, symmetric=True))
            getattr(self, f"{name}_scale").copy_(scale.flatten())
        self.clear_caches()

    def clear_caches(self) -> None:
        self._packed.clear()
        self._dense.clear()

    def matrix(self, name: str) -> torch.Tensor:
        """The float weight matrix ``name`` the codes stand for."""
        codes: torch.Tensor = getattr(self, f"{name}_q")
        scale: torch.Tensor = getattr(self, f"{name}_scale")
        return codes.to(torch.float32) / scale.unsqueeze(1)

    def weight_codes(self) -> torch.Tensor:
        return torch.cat([getattr(self, f"{n}_q").reshape(-1) for n in self.shape.weight_names()])

    def stored_codes(self) -> dict[str, int]:
        return {f"{n}_q": 8 for n in self.shape.weight_names()}

    def dense_weight(self) -> torch.Tensor:
        return torch.cat([self.matrix(n).reshape(-1) for n in self.shape.weight_names()])

    def macs(self, output: torch.Tensor) -> int:
        return self.shape.macs(output)

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        if self.kernel_path() == "fbgemm-int8":
            return KernelCost("fbgemm dynamic int8 recurrence", "int8", self.macs(output), own_bytes(self))
        float_bytes = 4 * sum(getattr(self, f"{n}_q").numel() for n in self.shape.weight_names())
        return KernelCost("int8 weights, float recurrence (dequantized)", "fp32", self.macs(output),
                          own_bytes(self) + float_bytes)

    def check_loaded(self) -> None:
        for name in self.shape.weight_names():
            scale, codes = getattr(self, f"{name}_scale"), getattr(self, f"{name}_q")
            if not bool((torch.isfinite(scale) & (scale > 0)).all()):
                raise ModelFormatError(f"{type(self).__name__}: {name} scales must be finite and > 0")
            if codes.numel() and int(codes.min()) < -127:
                raise ModelFormatError(f"{type(self).__name__}: symmetric int8 codes of {name} must lie in -127..127")
        self.clear_caches()

    # -- compute -----------------------------------------------------------------------------------

    def kernel_path(self) -> str:
        """``"fbgemm-int8"`` or ``"float"``: which recurrence runs here (decided once per process and shape)."""
        return rnn_kernel_choice(self).path

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        if x.dtype != torch.float32 and x.is_floating_point():
            x = x.float()
        kernel = None
        grad = torch.is_grad_enabled() and x.requires_grad
        if not grad and x.is_cpu and self.kernel_path() == "fbgemm-int8":
            kernel = self._fbgemm_call()
        return run_rnn(self.shape, x, hx, [] if kernel else self._flat_float(), self.training, kernel)

    def _flat_float(self) -> list[torch.Tensor]:
        key = tuple(getattr(self, f"{n}_q").data_ptr() for n in self.shape.weight_names())
        if self._dense.key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._dense.value = [self.matrix(n) if n.startswith("weight") else getattr(self, n).detach()
                                     for n in self.shape.flat_names()]
            self._dense.key = key
        return list(self._dense.value)

    def _fbgemm_call(self) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]:
        key = tuple(getattr(self, f"{n}_q").data_ptr() for n in self.shape.weight_names())
        if self._packed.key != key:
            self._packed.value = _pack_fbgemm(self)
            self._packed.key = key
        params, s = self._packed.value, self.shape

        def call(x: torch.Tensor, hx: Any) -> tuple[torch.Tensor, Any]:
            if s.mode == "LSTM":
                out, h, c = torch.quantized_lstm(x, hx, params, s.bias, s.num_layers, s.dropout, self.training,
                                                 s.bidirectional, s.batch_first, dtype=torch.qint8, use_dynamic=True)
                return out, (h, c)
            out, h = torch.quantized_gru(x, hx, params, s.bias, s.num_layers, s.dropout, self.training,
                                         s.bidirectional, s.batch_first)
            return out, h

        return call

    def extra_repr(self) -> str:
        return f"{self.shape.describe()}, int8 weights"


def _pack_fbgemm(layer: Int8DynamicRNN) -> list[Any]:
    """fbgemm's cell parameters (packed per-row int8 weights + float biases), one per layer and direction."""
    names = layer.shape.flat_names()
    per_cell = 4 if layer.shape.bias else 2
    cells = []
    with warnings.catch_warnings():  # quantized-tensor creation is deprecated in torch; the kernel still needs it
        warnings.simplefilter("ignore")
        for start in range(0, len(names), per_cell):
            w_ih, w_hh = (_per_row_qtensor(layer, n) for n in names[start : start + 2])
            if layer.shape.bias:
                b_ih, b_hh = (getattr(layer, n).detach() for n in names[start + 2 : start + 4])
            else:
                b_ih = b_hh = torch.zeros(w_ih.shape[0])
            packed_ih = torch.ops.quantized.linear_prepack(w_ih, b_ih)
            packed_hh = torch.ops.quantized.linear_prepack(w_hh, b_hh)
            cells.append(torch.ops.quantized.make_quantized_cell_params_dynamic(packed_ih, packed_hh, b_ih, b_hh, True))
    return cells


def _per_row_qtensor(layer: Int8DynamicRNN, name: str) -> torch.Tensor:
    codes = getattr(layer, f"{name}_q")
    step = (1.0 / getattr(layer, f"{name}_scale")).double()
    return torch._make_per_channel_quantized_tensor(codes, step, torch.zeros(codes.shape[0], dtype=torch.int64), 0)


@dataclasses.dataclass(frozen=True)
class RNNKernelChoice:
    """Which recurrence an int8 LSTM/GRU of one shape runs here, and the timings that decided it."""

    path: str  # "fbgemm-int8" or "float"
    float_ms: float
    int8_ms: float | None
    sqnr_db: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.path, "float_ms": round(self.float_ms, 4),
                "int8_ms": None if self.int8_ms is None else round(self.int8_ms, 4),
                "sqnr_db": None if self.sqnr_db is None else round(self.sqnr_db, 2), "reason": self.reason,
                "method": f"best of alternated calls at ({_TIMING_BATCH}, {_TIMING_STEPS}) inputs, "
                          f"{torch.get_num_threads()} threads, once per process and shape"}


_CHOICES: dict[RNNShape, RNNKernelChoice] = {}


def rnn_kernel_choice(layer: Int8DynamicRNN) -> RNNKernelChoice:
    """The recurrence ``layer``'s shape runs here (timed on first request with the layer's own weights)."""
    known = _CHOICES.get(layer.shape)
    if known is None:
        known = _CHOICES[layer.shape] = torch.compiler.disable(_time_rnn_kernels)(layer)
    return known


def _time_rnn_kernels(layer: Int8DynamicRNN, rounds: int = 3) -> RNNKernelChoice:
    s = layer.shape
    generator = torch.Generator().manual_seed(0)
    dims = (_TIMING_BATCH, _TIMING_STEPS) if s.batch_first else (_TIMING_STEPS, _TIMING_BATCH)
    x = torch.randn(*dims, s.input_size, generator=generator)
    flat = layer._flat_float()
    with torch.inference_mode():
        reference = run_rnn(s, x, None, flat, False)[0]
        try:
            kernel = layer._fbgemm_call()
            quantized = run_rnn(s, x, None, [], False, kernel)[0]
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            return RNNKernelChoice("float", _best(lambda: run_rnn(s, x, None, flat, False), rounds), None, None,
                                   f"fbgemm's int8 {s.mode} kernel is not available here ({str(exc)[:80]})")
        sqnr = P.sqnr_db(reference, quantized)
        calls = {"float": lambda: run_rnn(s, x, None, flat, False),
                 "int8": lambda: run_rnn(s, x, None, [], False, kernel)}
        best = dict.fromkeys(calls, math.inf)
        for _ in range(rounds + 1):  # alternated; the first round warms up
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    float_ms, int8_ms = best["float"] * 1e3, best["int8"] * 1e3
    if sqnr < MIN_KERNEL_SQNR_DB:
        return RNNKernelChoice("float", float_ms, int8_ms, sqnr,
                               f"fbgemm's int8 {s.mode} output differs from the float one ({sqnr:.1f} dB)")
    if int8_ms < float_ms:
        return RNNKernelChoice("fbgemm-int8", float_ms, int8_ms, sqnr, "int8 kernel timed faster here")
    return RNNKernelChoice("float", float_ms, int8_ms, sqnr,
                           "fbgemm's int8 kernel timed slower than the float recurrence here: smaller, not faster")


def _best(call: Callable[[], Any], rounds: int) -> float:
    best = math.inf
    for _ in range(rounds + 1):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3
