"""Learned rounding of 8-bit weights (AdaRound: Nagel et al., 2020), on ONNX Runtime's per-channel grid.

Rounding each weight to its nearest grid point minimises each weight's own error, not the layer's
output error; for a network as sensitive as MobileNetV2 the difference is several points of top-1
agreement. For every Conv/Linear layer, in the order the model calls them, a soft choice between
rounding down and up, ``h(V) ∈ [0, 1]`` (a rectified sigmoid), is fitted with Adam so that the
layer's output on calibration inputs matches the float layer's output; a regulariser whose exponent
is annealed from 20 to 2 pushes every ``h`` to 0 or 1, and the choice is then made hard.

The layer's inputs come from the model as quantized so far (earlier layers already on their learned
grid, every layer input fake-quantized to 8 bits over its calibration range, as the int8 runtime does),
the targets from the float model: each layer learns to undo part of the error that reaches it. Both are
gathered in one pass over each model: the model, traced with torch.fx, runs node by node and pauses at
each layer's call until that layer is learned (:class:`_InputStream`); a model that cannot be traced
faithfully is run again from its input for each layer, which gives the same inputs, slowly.

The result is a float model whose weights lie exactly on the grid ONNX Runtime will use
(:func:`nnopt.quantization.equalize.weight_grid`), so its quantizer recomputes the same codes: each
channel's largest-magnitude weight is kept as it was (ONNX Runtime derives the channel's step from it),
and every other weight is ``code × step`` with ``|code| ≤ 127``, which it rounds back to ``code``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from nnopt.errors import ConfigError

LEARNED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
STRETCH = (-0.1, 1.1)  # the rectified sigmoid's range before clipping to [0, 1] (AdaRound's γ, ζ)
MAX_CODE = 127  # symmetric codes −127..127 for both int8 and uint8 (zero point 128): ±128 would move the step


@dataclasses.dataclass(frozen=True)
class LearnedRoundingConfig:
    """``steps`` Adam steps per layer on ``batch`` calibration rows each; ``regularization``: weight of the term
    that drives each rounding choice to 0 or 1; ``quantize_inputs``: fake-quantize every layer's input to 8 bits
    while collecting the inputs (the int8 runtime's activations)."""

    steps: int = 300
    batch: int = 8
    learning_rate: float = 3e-2
    regularization: float = 1.0  # against the output error relative to nearest rounding's (1 at the start)
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    quantize_inputs: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ConfigError(f"learned rounding needs steps >= 1 and batch >= 1, got {self.steps} and {self.batch}")
        if self.learning_rate <= 0 or self.regularization < 0:
            raise ConfigError("learned rounding needs learning_rate > 0 and regularization >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"learned rounding: warmup is a fraction of the steps in [0, 1), got {self.warmup}")


@dataclasses.dataclass
class LayerRounding:
    """One layer's result: output MSE (relative to the float output's mean square) with nearest and learned
    rounding, on the calibration inputs, and the share of weights rounded the other way than nearest."""

    name: str
    nearest_error: float
    learned_error: float
    flipped: float

    def to_dict(self) -> dict[str, Any]:
        return {"nearest_error": self.nearest_error, "learned_error": self.learned_error, "flipped": self.flipped}


def grid_step(w: torch.Tensor, weights: str) -> torch.Tensor:
    """Per-output-channel step of ONNX Runtime's symmetric 8-bit weights, shaped to broadcast over ``w``."""
    if weights not in ("int8", "uint8"):
        raise ConfigError(f"weights must be 'int8' or 'uint8', got {weights!r}")
    dims = tuple(range(1, w.ndim))
    absmax = w.detach().to(torch.float32).abs().amax(dim=dims, keepdim=True)
    span = 254 if weights == "int8" else 255
    step = (2 * absmax.to(torch.float64) / span).to(torch.float32)
    return torch.where(step > 0, step, torch.ones_like(step))


def learn_rounding(model: nn.Module, calibration: torch.Tensor, weights: str = "uint8",
                   config: LearnedRoundingConfig = LearnedRoundingConfig(), layers: Sequence[str] | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[nn.Module, dict[str, LayerRounding]]:
    """A copy of ``model`` whose Conv/Linear weights (or the named ``layers``) lie on learned grid points.

    ``model`` is not modified. ``calibration``: input rows (e.g. 32–128 images). Returns the copy and each
    layer's :class:`LayerRounding`, in the order the layers were learned.
    """
    config.validate()
    grid_step(torch.ones(1, 1), weights)  # validates ``weights``
    if not isinstance(calibration, torch.Tensor) or len(calibration) < 1:
        raise ConfigError("learned rounding needs calibration inputs (a non-empty tensor)")
    reference = copy.deepcopy(model).eval()
    rounded = copy.deepcopy(model).eval()
    modules = dict(rounded.named_modules())
    unknown = [n for n in (layers or ()) if n not in modules]
    if unknown:
        raise ConfigError(f"learned rounding: no layer named {', '.join(unknown)}")
    order = _call_order(reference, calibration[:1], layers)
    ranges = _input_ranges(reference, order, calibration) if config.quantize_inputs else {}
    float_stream = _input_gatherer(reference, order, calibration, {})
    quantized_stream = _input_gatherer(rounded, order, calibration, ranges)
    generator = torch.Generator().manual_seed(config.seed)
    results: dict[str, LayerRounding] = {}
    for index, name in enumerate(order):
        if progress:
            progress(f"learning the rounding of {name} ({index + 1}/{len(order)})")
        float_inputs = float_stream(name)
        quantized_inputs = quantized_stream(name)  # layers before ``name`` are on their learned grid by now
        layer: Any = modules[name]
        results[name] = _learn_layer(name, layer, float_inputs, quantized_inputs, weights, config, generator)
    return rounded, results


def _call_order(model: nn.Module, example: torch.Tensor, layers: Sequence[str] | None) -> list[str]:
    """Names of the learnable layers in the order one forward pass calls them (each once)."""
    wanted = set(layers) if layers is not None else None
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LEARNED_TYPES) and (wanted is None or name in wanted):
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, n=name: order.append(n) if n not in order else None))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if layers is not None:
        bad = [n for n in layers if n in dict(model.named_modules()) and n not in order]
        if bad:
            raise ConfigError("learned rounding takes Conv1d/Conv2d/Linear layers the model calls; "
                              f"not {', '.join(bad)}")
    return order


def _input_ranges(model: nn.Module, names: list[str], calibration: torch.Tensor) -> dict[str, tuple[float, float]]:
    from nnopt.quantization.layer_sensitivity import input_ranges

    return input_ranges(model, names, calibration)


class _Captured(Exception):
    """Raised by the capture hook: nothing after the layer needs to run."""


GATHER_BATCH = 32  # calibration rows per forward pass while gathering layer inputs


def _input_gatherer(model: nn.Module, order: list[str], calibration: torch.Tensor,
                    ranges: dict[str, tuple[float, float]]) -> Callable[[str], torch.Tensor]:
    """A function giving each layer's inputs (asked for in ``order``) as :func:`_layer_inputs` does: from one
    pass over the traced model where it traces faithfully, else by running ``model`` again for each layer."""
    traced = _trace(model, calibration[:1], order)
    if traced is None:
        return lambda name: _layer_inputs(model, name, calibration, ranges)
    return _InputStream(model, traced, calibration, ranges).inputs


def _layer_inputs(model: nn.Module, name: str, calibration: torch.Tensor,
                  ranges: dict[str, tuple[float, float]], batch: int = GATHER_BATCH) -> torch.Tensor:
    """The named layer's input on every calibration row; with ``ranges``, every layer input on the way is
    fake-quantized to 8 bits over its range (the layer's own input too). Runs ``model`` from its input up to
    the layer: the slow way, for models :func:`_trace` refuses (and the reference :class:`_InputStream` is
    tested against)."""
    captured: list[torch.Tensor] = []
    quantizers = {layer: _input_quantizer(limits) for layer, limits in ranges.items()}
    handles = _gathering_hooks(model, name, quantizers, captured)
    try:
        with torch.inference_mode():
            for i in range(0, len(calibration), batch):
                try:
                    model(calibration[i:i + batch])
                except _Captured:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(captured)  # a copy, made outside inference mode: autograd may save it


def _input_quantizer(limits: tuple[float, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fake quantization to 8 bits over ``limits`` (asymmetric, as the int8 runtime's activations)."""
    from nnopt.layers.primitives import fake_quantize, qparams_from_range

    scale, zero = qparams_from_range(*limits, bits=8, symmetric=False)
    return lambda x: fake_quantize(x, scale, zero, bits=8, symmetric=False)


def _gathering_hooks(model: nn.Module, name: str, quantizers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                     captured: list[torch.Tensor]) -> list[Any]:
    """Pre-hooks that pass the input of every layer in ``quantizers`` through its quantizer and, at the named
    layer, append its (quantized) input to ``captured`` and stop the forward pass by raising
    :class:`_Captured`. Nothing runs on a captured tensor before the caller copies it: no clone here."""
    modules = dict(model.named_modules())

    def quantize(quantizer: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (quantizer(args[0]),) + args[1:]
        return hook

    def capture(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())
        raise _Captured

    handles = []
    try:
        for layer_name, quantizer in quantizers.items():
            handles.append(modules[layer_name].register_forward_pre_hook(quantize(quantizer)))
        handles.append(modules[name].register_forward_pre_hook(capture))  # after its own quantize hook
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _trace(model: nn.Module, example: torch.Tensor, order: list[str]) -> Any:
    """``model`` as a ``torch.fx.GraphModule`` that calls the model's own learnable layers (so their hooks and
    weights are the model's), or None where it cannot be traced faithfully: tracing fails (control flow on
    values), a layer is not one call, a module that tracing inlines has hooks, a learnable layer's parameters
    are read outside its call, the model takes more than one input, or the traced graph's output on
    ``example`` differs from the model's by a bit."""
    from torch import fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            # a Conv/Linear subclass from outside torch.nn stays one call, so the capture hook runs on it
            return isinstance(m, LEARNED_TYPES) or super().is_leaf_module(m, module_qualified_name)

    try:
        graph = Tracer().trace(model)
        traced = fx.GraphModule(model, graph)
    except Exception:  # any tracing failure (TraceError, TypeError, ...) means the slow way
        return None
    modules = dict(model.named_modules())
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    if any(name not in called or traced.get_submodule(name) is not modules[name] for name in order):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for n, m in modules.items() if n not in called):
        return None  # hooks on a module whose forward tracing inlined would not run
    learned = set(order)
    if any(node.op == "get_attr" and str(node.target).rpartition(".")[0] in learned for node in graph.nodes):
        return None  # a layer's weight read before its call would be read before it is learned
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if not placeholders or any(str(n.target).startswith("*") or not n.args for n in placeholders[1:]):
        return None  # only the first input is given; the others must have defaults
    with torch.inference_mode():
        same = _same_values(traced(example), model(example))
    return traced if same else None


def _same_values(a: Any, b: Any) -> bool:
    """Bitwise equality of two outputs (tensors, or tuples, lists and dicts of them)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


class _InputStream:
    """The inputs of each learnable layer in turn, gathered in one pass over a traced model.

    The graph runs node by node on each chunk of calibration rows, keeping the values later nodes still
    need, and pauses at the call of the layer asked for, with the same hooks as :func:`_layer_inputs`
    (its input captured after every layer input on the way is fake-quantized). The next request resumes
    there: that layer's call runs again, now with its learned weights, and so does everything after it.
    Nothing before it depends on its weights, so the inputs equal those of running the model again from
    its input, at the cost of one forward pass in all instead of one per layer. The paused layer's
    quantized input is kept, not computed again when its call resumes (fake quantization costs more
    than a float forward pass here).
    """

    def __init__(self, model: nn.Module, traced: Any, calibration: torch.Tensor,
                 ranges: dict[str, tuple[float, float]], batch: int = GATHER_BATCH) -> None:
        from torch import fx

        self._model = model
        self._quantizers = {layer: _input_quantizer(limits) for layer, limits in ranges.items()}
        self._nodes = list(traced.graph.nodes)
        self._interpreter = fx.Interpreter(traced, garbage_collect_values=False)
        last_use = {node: i for i, node in enumerate(self._nodes)}  # a value nobody reads goes at once
        for i, node in enumerate(self._nodes):
            for source in node.all_input_nodes:
                last_use[source] = i
        self._free_after: dict[int, list[Any]] = {}
        for node, i in last_use.items():
            self._free_after.setdefault(i, []).append(node)
        self._chunks = [calibration[i:i + batch] for i in range(0, len(calibration), batch)]
        self._envs: list[dict[Any, Any]] = [{} for _ in self._chunks]
        self._position = 0  # the next node to run: the last requested layer's call
        self._paused = ""  # that layer, and its inputs as (float, quantized) pairs, one per chunk
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []

    def inputs(self, name: str) -> torch.Tensor:
        """The named layer's inputs on every calibration row; layers must be asked for in call order."""
        captured: list[torch.Tensor] = []
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        quantizers = {layer: self._reusing(layer, quantizer, name, kept)
                      for layer, quantizer in self._quantizers.items()}
        handles = _gathering_hooks(self._model, name, quantizers, captured)
        stops = set()
        try:
            with torch.inference_mode():
                for chunk, env in zip(self._chunks, self._envs):
                    stops.add(self._advance(chunk, env))
        finally:
            for handle in handles:
                handle.remove()
        if len(stops) != 1 or len(captured) != len(self._chunks):
            raise RuntimeError(f"learned rounding: the traced model did not stop once per chunk at {name}")
        self._position = stops.pop()
        self._paused, self._held = name, kept
        return torch.cat(captured)  # a copy, made outside inference mode: autograd may save it

    def _reusing(self, layer: str, quantizer: Callable[[torch.Tensor], torch.Tensor], target: str,
                 kept: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``quantizer``, but the paused layer's call, resumed on the very tensor it paused on, gets the
        quantized input computed then (once: a later call of a shared layer computes afresh); the
        target's quantized inputs are kept in ``kept``."""
        def quantize(x: torch.Tensor) -> torch.Tensor:
            if layer == self._paused:
                for i, (seen, quantized) in enumerate(self._held):
                    if seen is x:
                        del self._held[i]
                        return quantized
            quantized = quantizer(x)
            if layer == target:
                kept.append((x, quantized))
            return quantized
        return quantize

    def _advance(self, chunk: torch.Tensor, env: dict[Any, Any]) -> int:
        """Run ``chunk``'s nodes from the current position until a capture hook stops the pass; its index."""
        self._interpreter.env = env
        for i in range(self._position, len(self._nodes)):
            node = self._nodes[i]
            if node.op == "output":
                break
            if node.op == "placeholder":  # placeholders come first: the chunk, then defaults (_trace checked)
                env[node] = chunk if i == 0 else node.args[0]
            else:
                try:
                    env[node] = self._interpreter.run_node(node)
                except _Captured:
                    return i
            for done in self._free_after.get(i, ()):
                env.pop(done, None)
        raise RuntimeError("learned rounding: the traced model ended before the layer asked for")


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    low, high = STRETCH
    return (torch.sigmoid(v) * (high - low) + low).clamp(0, 1)


def _learn_layer(name: str, layer: Any, float_inputs: torch.Tensor, quantized_inputs: torch.Tensor, weights: str,
                 config: LearnedRoundingConfig, generator: torch.Generator) -> LayerRounding:
    original = layer.weight.detach().clone()
    step = grid_step(original, weights)
    scaled = original.to(torch.float32) / step
    floor = torch.floor(scaled).clamp(-MAX_CODE, MAX_CODE - 1)
    nearest = torch.round(scaled).clamp(-MAX_CODE, MAX_CODE)
    # each channel's largest |w| stays as it is: ONNX Runtime derives the channel's step from it
    absmax = original.abs().amax(dim=tuple(range(1, original.ndim)), keepdim=True)
    pinned = original.abs() == absmax
    # what ONNX Runtime makes of a pinned weight: uint8's ±127.5 steps round to code 128 or −128, clipped to 127
    pinned_value = (torch.round(scaled).clamp(-128 if weights == "uint8" else -MAX_CODE, MAX_CODE)
                    * step).to(original.dtype)
    low, high = STRETCH
    start = ((scaled - floor).clamp(0, 1) - low) / (high - low)  # h(v) equals the rest: nearest's soft twin
    v = torch.logit(start).requires_grad_(True)

    def on_grid(codes: torch.Tensor, deployed: bool = False) -> torch.Tensor:
        """The weights as ONNX Runtime computes with them, or (``deployed``) as written for it to quantize:
        the pinned weights as they were, so that it derives the same step."""
        # code ±127 × step can exceed max|w| by an ulp (int8), which would move ONNX Runtime's step
        grid = torch.clamp((codes * step).to(original.dtype), -absmax, absmax)
        return torch.where(pinned, original if deployed else pinned_value, grid)

    def output(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(layer, {"weight": w}, (x,))
        return out

    with torch.no_grad():
        target = torch.cat([output(original, float_inputs[i:i + 16]) for i in range(0, len(float_inputs), 16)])
    power = float(target.double().pow(2).mean()) or 1.0

    def error(w: torch.Tensor) -> float:
        with torch.no_grad():
            total = sum(float((output(w, quantized_inputs[i:i + 16]) - target[i:i + 16]).double().pow(2).sum())
                        for i in range(0, len(target), 16))
        return total / target.numel() / power

    nearest_error = error(on_grid(nearest))
    optimizer = torch.optim.Adam([v], lr=config.learning_rate)
    warm = int(config.warmup * config.steps)
    rows = len(quantized_inputs)
    for t in range(config.steps):
        idx = torch.randint(rows, (min(config.batch, rows),), generator=generator)
        h = _rectified_sigmoid(v)
        soft = torch.where(pinned, pinned_value, ((floor + h) * step).to(original.dtype))
        loss = (output(soft, quantized_inputs[idx]) - target[idx]).pow(2).mean() / (power * max(nearest_error, 1e-12))
        if t >= warm and config.regularization:
            beta = config.beta[0] + (config.beta[1] - config.beta[0]) * (t - warm) / max(1, config.steps - warm)
            loss = loss + config.regularization * (1 - (2 * h - 1).abs().pow(beta)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = (floor + (_rectified_sigmoid(v) >= 0.5).to(floor.dtype)).clamp(-MAX_CODE, MAX_CODE)
    learned_error = error(on_grid(learned))
    if not math.isfinite(learned_error) or learned_error >= nearest_error:  # never worse than nearest
        learned, learned_error = nearest, nearest_error
    with torch.no_grad():
        layer.weight.copy_(on_grid(learned, deployed=True))
    moved = ~pinned
    flipped = float((learned != nearest)[moved].double().mean()) if bool(moved.any()) else 0.0
    return LayerRounding(name, nearest_error, learned_error, flipped)
