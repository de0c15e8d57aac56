"""Preparing a float CNN for int8: cross-layer equalization and weight-quantization bias correction.

Both change a (BatchNorm-folded) float model in place so that the int8 model made from it is closer
to the original, and both keep the float model's function:
- **Cross-layer equalization** (Nagel et al., "Data-Free Quantization", ICCV 2019): for two layers
  joined by a positive-homogeneous activation (ReLU, LeakyReLU, PReLU, identity), output channel i
  of the first is divided by s_i and input channel i of the second multiplied by s_i, with
  s_i = sqrt(r1_i / r2_i) so that both channel ranges become sqrt(r1_i · r2_i). Exact in float
  (f(x/s) = f(x)/s for s > 0); it evens out the per-channel weight ranges that per-tensor
  quantization and depthwise layers suffer from. ReLU6 is not positive-homogeneous (its clip at 6
  would move), so pairs joined by it are left as they are, with that reason.
- **Bias correction** (same paper, analytic form): weight rounding shifts each output's mean by
  (W_q − W)·E[x]; subtracting that shift from the bias removes the systematic part of the error.
  ``E[x]`` per input channel comes from calibration data; W_q is the weight grid the runtime will
  use (``weight_grid``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError, UnsupportedModelError

POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
PASS_THROUGH = (nn.Identity, nn.Dropout)  # what BatchNorm folding leaves behind; Dropout is identity in eval
EQUALIZED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def weight_grid(w: torch.Tensor, weights: str = "int8") -> torch.Tensor:
    """The float values of per-output-channel symmetric 8-bit weights, as ONNX Runtime quantizes them.

    ``"int8"``: codes −127..127, step max|w|/127; ``"uint8"``: codes 0..255 around zero point 128,
    step 2·max|w|/255 (ONNX Runtime's symmetric QUInt8 weights). The step is rounded to float32 and the
    division done in float32, as ONNX Runtime does, so that ties round the same way. An all-zero channel
    stays zero.
    """
    if weights not in ("int8", "uint8"):
        raise ConfigError(f"weights must be 'int8' or 'uint8', got {weights!r}")
    dims = tuple(range(1, w.ndim))
    w32 = w.detach().to(torch.float32)
    absmax = w32.abs().amax(dim=dims, keepdim=True) if dims else w32.abs()
    span = 254 if weights == "int8" else 255
    step = (2 * absmax.to(torch.float64) / span).to(torch.float32)
    step = torch.where(step > 0, step, torch.ones_like(step))
    lo, hi = (-127, 127) if weights == "int8" else (-128, 127)
    return (torch.round(w32 / step).clamp(lo, hi) * step).to(w.dtype)


# --------------------------------------------------------------------------- equalization


def equalization_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(first, second) layer names that equalization may rescale, and the pairs left out with why.

    A pair is a Conv/Linear whose output feeds only, through at most one activation module (and any
    Identity or Dropout, e.g. folded BatchNorms), a Conv/Linear (a full convolution or a depthwise
    one); found by tracing the model with torch.fx.
    """
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many kinds; name the model and the cause
        raise UnsupportedModelError(f"equalization traces the model with torch.fx, which failed: {exc}") from None
    modules = dict(model.named_modules())

    def module_of(node: fx.Node) -> nn.Module | None:
        return modules.get(str(node.target)) if node.op == "call_module" else None

    pairs: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    for node in graph.nodes:
        first = module_of(node)
        groups = getattr(first, "groups", 1)
        if not isinstance(first, EQUALIZED_TYPES) or groups not in (1, _out_channels(first)):
            continue  # a grouped (not depthwise) first layer: its output channels mix only within groups
        chain: list[nn.Module] = []
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            layer = module_of(user)
            if isinstance(layer, EQUALIZED_TYPES):
                reason = _pair_refusal(first, layer, chain)
                if reason is None:
                    pairs.append((str(node.target), str(user.target)))
                else:
                    skipped[f"{node.target} -> {user.target}"] = reason
                break
            if layer is None:
                break
            if not isinstance(layer, PASS_THROUGH):
                if chain:  # two activations in a row: not a pair this method handles
                    break
                chain.append(layer)
            current = user
    return pairs, skipped


def _pair_refusal(first: nn.Module, second: nn.Module, between: list[nn.Module]) -> str | None:
    for act in between:
        if not isinstance(act, POSITIVE_HOMOGENEOUS):
            return f"{type(act).__name__} between them is not positive-homogeneous (f(x/s) != f(x)/s)"
        if isinstance(act, nn.PReLU) and act.weight.numel() not in (1, _out_channels(first)):
            return "PReLU with a slope count that is not per channel"
    groups = getattr(second, "groups", 1)
    if groups not in (1, _out_channels(first)) or (groups > 1 and _out_channels(second) != groups):
        return f"the second layer is a grouped convolution ({groups} groups)"
    if _in_channels(second) != _out_channels(first):
        return "channel counts differ (a reshape or concatenation between them)"
    return None


def _out_channels(layer: Any) -> int:
    return int(layer.weight.shape[0])


def _in_channels(layer: Any) -> int:
    groups = getattr(layer, "groups", 1)
    return int(layer.weight.shape[1]) * groups


def equalize(model: nn.Module, iterations: int = 20, tolerance: float = 1e-4) -> dict[str, Any]:
    """Cross-layer equalization of every pair :func:`equalization_pairs` finds, in place.

    Repeats over all pairs (a depthwise layer sits in two) until no scale moves by more than
    ``tolerance``. Returns the pairs, the skipped pairs with reasons, and the rounds run.
    """
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    pairs, skipped = equalization_pairs(model)
    modules = dict(model.named_modules())
    rounds = 0
    with torch.no_grad():
        while rounds < iterations:
            rounds += 1
            moved = max((_equalize_pair(modules[a], modules[b]) for a, b in pairs), default=0.0)
            if moved <= tolerance:
                break
    return {"pairs": [list(p) for p in pairs], "skipped": skipped, "rounds": rounds}


def _equalize_pair(first: Any, second: Any) -> float:
    w1, w2 = first.weight, second.weight  # (out1, in1, ...) and (out2, in2/groups, ...)
    r1 = w1.abs().flatten(1).amax(dim=1)
    depthwise = getattr(second, "groups", 1) > 1
    r2 = w2.abs().flatten(1).amax(dim=1) if depthwise else w2.abs().transpose(0, 1).flatten(1).amax(dim=1)
    ok = (r1 > 0) & (r2 > 0)
    scale = torch.where(ok, torch.sqrt(r1 / r2.clamp(min=1e-12)), torch.ones_like(r1))  # s_i: divide first by it
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    w1.div_(scale.view(shape1))
    if first.bias is not None:
        first.bias.div_(scale)
    if depthwise:
        w2.mul_(scale.view(shape1))
    else:
        w2.mul_(scale.view((1, -1) + (1,) * (w2.ndim - 2)))
    return float((scale - 1).abs().max()) if scale.numel() else 0.0


# --------------------------------------------------------------------------- bias correction


def input_means(model: nn.Module, names: Iterable[str], batches: Iterable[Any],
                run: Callable[[nn.Module, Any], object]) -> dict[str, torch.Tensor]:
    """Mean of each named layer's input per channel (dim 1 for convolutions, last dim for Linear)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float64)
            if isinstance(module, nn.Linear):
                flat = x.reshape(-1, x.shape[-1])
            else:
                flat = x.transpose(0, 1).reshape(x.shape[1], -1).t()
            sums[name] = sums.get(name, torch.zeros(flat.shape[1], dtype=torch.float64)) + flat.sum(dim=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).to(torch.float32) for name in sums}


def bias_shifts(model: nn.Module, means: dict[str, torch.Tensor], weights: str = "int8") -> dict[str, torch.Tensor]:
    """Each layer's expected output shift from weight rounding, (W_q − W)·E[x], per output channel."""
    modules = dict(model.named_modules())
    shifts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mean in means.items():
            layer: Any = modules[name]
            w = layer.weight
            error = weight_grid(w, weights) - w  # (out, in/groups, ...)
            groups = getattr(layer, "groups", 1)
            per_in = error.flatten(2).sum(dim=2) if error.ndim > 2 else error  # (out, in/groups)
            mean_groups = mean.view(groups, -1)  # (groups, in/groups)
            out_per_group = per_in.shape[0] // groups
            shift = (per_in.view(groups, out_per_group, -1) * mean_groups[:, None, :]).sum(dim=2).flatten()
            if not bool(torch.isfinite(shift).all()):
                raise ConfigError(f"layer {name!r}: calibration inputs hold NaN or inf")
            shifts[name] = shift
    return shifts


def correct_bias(model: nn.Module, shifts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Subtract :func:`bias_shifts` from the layers' biases, in place (a layer without a bias gets one);
    returns the largest correction per layer."""
    modules = dict(model.named_modules())
    done: dict[str, float] = {}
    with torch.no_grad():
        for name, shift in shifts.items():
            layer: Any = modules[name]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
            layer.bias.sub_(shift.to(layer.bias.dtype))
            done[name] = float(shift.abs().max()) if shift.numel() else 0.0
    return done
