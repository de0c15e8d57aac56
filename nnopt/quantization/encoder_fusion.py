"""Exact rewrites of BERT-family encoder layers that let dynamic int8 kernels do more per call.

Found by structure (the module layout of Hugging Face's BERT, which MiniLM uses), planned on the
float model and applied after its Linears became :class:`Int8DynamicLinear`:

- ``gelu``: the FFN's GELU (exact erf form) moves into its first Linear, whose oneDNN kernel
  applies it in the GEMM epilogue instead of a separate pass over a (tokens × 1536) tensor;
- ``value_smoothing``: the attention output projection's SmoothQuant vector 1/s moves into the
  value projection's per-channel scales and bias. The attention context ``P · V`` is linear in
  each channel of V, so scaling V's output channels scales the context's channels the same way,
  and per-channel int8 codes do not change when a row is scaled: exact, one multiply less;
- ``shared_input``: query, key and value read the same tensor; with one smoothing vector (the
  calibration takes the joint weight range) it is smoothed and quantized once, not three times;
- ``residual``: an output block ``LayerNorm(dropout(dense(h)) + residual)`` becomes
  :class:`ResidualOutput`, whose int8 GEMM adds the residual in its epilogue (in eval mode,
  where dropout is the identity; training mode keeps the original order);
- ``bf16_attention`` (opt-in): query, key and value write bfloat16, so that the attention
  product and softmax run in bf16; the output projection reads the bf16 context as float32.

The plan is recorded in the pass's details, so that loading a saved model rebuilds the same
structure before the weights are read.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.layers import kernels as K


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def _is_exact_gelu(act: object) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    # transformers' GELUActivation keeps torch's exact gelu in ``act``
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


class ResidualOutput(nn.Module):
    """BERT's output block, ``LayerNorm(dropout(dense(h)) + residual)``, with the residual added
    by the int8 GEMM. Children keep their names, so state-dict keys do not change."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = source.dense, source.dropout, source.LayerNorm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
        return self.LayerNorm(self.dense(hidden_states, residual=input_tensor))


def _is_output_block(module: nn.Module) -> bool:
    """BertSelfOutput / BertOutput: dense, dropout, LayerNorm and forward(hidden_states, input_tensor)."""
    if set(dict(module.named_children())) != {"dense", "dropout", "LayerNorm"}:
        return False
    if not isinstance(module.LayerNorm, nn.LayerNorm) or not isinstance(module.dropout, nn.Dropout):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params == ["hidden_states", "input_tensor"]


def plan_fusions(model: nn.Module, targets: set[str], attention_bf16: bool = False) -> dict[str, list[Any]]:
    """Which rewrites apply to ``model`` (float), given the names of the Linears being quantized.

    ``attention_bf16`` also lists the query/key/value groups whose outputs become bfloat16.
    """
    plan: dict[str, list[Any]] = {
        "gelu": [], "value_smoothing": [], "shared_input": [], "bf16_attention": [], "residual": [],
    }
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if name and _is_output_block(module) and f"{prefix}dense" in targets:
            plan["residual"].append(name)
        if _has(module, "dense", "intermediate_act_fn") and _is_exact_gelu(module.intermediate_act_fn):
            if f"{prefix}dense" in targets and isinstance(module.dense, nn.Linear):
                plan["gelu"].append(name)
        if _has(module, "self", "output") and _has(module.self, "query", "key", "value") and _has(
            module.output, "dense"
        ):
            if getattr(module.self, "position_embedding_type", "absolute") != "absolute":
                continue  # relative position terms read the key and query projections directly
            qkv = [f"{prefix}self.{part}" for part in ("query", "key", "value")]
            dense = f"{prefix}output.dense"
            if all(n in targets for n in qkv):
                plan["shared_input"].append(qkv)
                if attention_bf16:
                    plan["bf16_attention"].append(qkv)
            if qkv[2] in targets and dense in targets:
                plan["value_smoothing"].append([qkv[2], dense])
    return plan


def shared_groups(plan: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Each member name of a shared-input group, mapped to the whole group."""
    return {member: group for group in plan.get("shared_input", []) for member in group}


def apply_fusions(model: nn.Module, plan: dict[str, list[Any]], fold_values: bool) -> list[str]:
    """Rewrite ``model`` (int8 Linears in place) as ``plan`` says; returns the dense layers whose
    smoothing moved into the value projection (their ``input_smoothing`` is gone).

    ``fold_values`` is False when replaying a saved model: its value scales already hold the fold.
    """
    from nnopt.layers.int8 import Int8DynamicLinear
    from nnopt.select import replace_layer

    for name in plan.get("residual", []):
        block = model.get_submodule(name)
        if isinstance(block.dense, Int8DynamicLinear) and not isinstance(block, ResidualOutput):
            replace_layer(model, name, ResidualOutput(block))
    for name in plan.get("gelu", []):
        block = model.get_submodule(name)
        if isinstance(block.dense, Int8DynamicLinear):
            block.dense.activation = "gelu"
            block.intermediate_act_fn = nn.Identity()
    folded = []
    for value_name, dense_name in plan.get("value_smoothing", []):
        value, dense = model.get_submodule(value_name), model.get_submodule(dense_name)
        if not (isinstance(value, Int8DynamicLinear) and isinstance(dense, Int8DynamicLinear)):
            continue
        if fold_values:
            if not dense.smoothing:
                continue
            inverse = dense.input_smoothing  # 1 / s: the context's channels get scaled by it
            with torch.no_grad():
                value.weight_scale.div_(inverse)
                if value.bias is not None:
                    value.bias.mul_(inverse)
            value.refresh()
            del dense.input_smoothing
            dense.smoothing = False
        folded.append(dense_name)
    for group in plan.get("shared_input", []):
        members = [model.get_submodule(n) for n in group]
        if all(isinstance(m, Int8DynamicLinear) for m in members):
            shared = K.SharedInputCodes(len(members))
            for member in members:
                member.shared_input = shared
    groups = plan.get("bf16_attention", [])
    if groups and not _bf16_native_or_warn():
        groups = []
    for group in groups:
        for name in group:
            member = model.get_submodule(name)
            if isinstance(member, Int8DynamicLinear):
                member.output_dtype = torch.bfloat16
    return folded


def _bf16_native_or_warn() -> bool:
    """False (after one warning line) where bf16 attention would be emulated: a saved model whose
    attention was made bf16 on another CPU then runs it in float32 here, as fast and more exact."""
    import warnings

    from nnopt.cpu import bf16_support

    native, why = bf16_support()
    if native is False:
        warnings.warn(f"nnopt: bf16 attention runs in float32 on this machine: {why}", stacklevel=3)
    return native is not False
