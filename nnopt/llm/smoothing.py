"""Per-input-channel smoothing scales folded into a Llama-family decoder layer (shared by AWQ and SmoothQuant).

A Linear ``y = W x`` computes the same function as ``y = (W · diag(s)) (x / s)``: multiplying the columns
of the *consumers* of an input by ``s`` and dividing that input by ``s`` where it is produced changes
nothing in float, but moves magnitude between the weights and the activations, which changes what
quantization loses. Within one decoder layer (transformers' Llama, Mistral, Qwen2, Qwen3 layers) the
producers that can absorb ``1 / s`` exactly are:

* ``input_layernorm`` (RMSNorm, output ``weight · x / rms(x)``) for ``self_attn.{q,k,v}_proj``,
* ``self_attn.v_proj``'s rows (and bias) for ``self_attn.o_proj``: attention only takes weighted sums of
  each value channel, so scaling v's output channels scales o's input channels. Only where v's outputs
  *are* o's inputs: with grouped-query attention (fewer key/value heads) each value channel feeds several
  of o's inputs and the pair is skipped,
* ``post_attention_layernorm`` for ``mlp.{gate,up}_proj``,
* ``mlp.up_proj``'s rows for ``mlp.down_proj`` (its input is ``act(gate(x)) · up(x)``, linear in up).

:func:`scale_groups` lists the groups a layer has, in that order; :func:`fold_scales` applies one group's
scales in place. The layer's float outputs stay the same (up to float rounding).

>>> import torch
>>> from transformers import LlamaConfig
>>> from transformers.models.llama.modeling_llama import LlamaDecoderLayer
>>> layer = LlamaDecoderLayer(LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
...                                       num_key_value_heads=4), 0)
>>> [g.producer for g in scale_groups(layer)]
['input_layernorm', 'self_attn.v_proj', 'post_attention_layernorm', 'mlp.up_proj']
"""

from __future__ import annotations

import dataclasses

import torch

from nnopt.errors import ConfigError

# (producer, consumers) in the order AWQ searches them; the producer is a norm or a Linear whose rows feed
# the consumers' inputs one to one.
_CANDIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Linears fed the same input (``consumers``, module paths inside the layer) and the module that
    produces that input and absorbs ``1 / s`` (``producer``: an RMSNorm or a Linear)."""

    producer: str
    consumers: tuple[str, ...]


def scale_groups(layer: torch.nn.Module) -> list[ScaleGroup]:
    """The groups of ``layer`` whose shared input can be rescaled exactly (module docstring), in AWQ's
    order; pairs the layer lacks, or whose shapes do not match one to one (v_proj → o_proj under
    grouped-query attention), are left out."""
    groups = []
    for producer, consumers in _CANDIDATES:
        source = _find(layer, producer)
        sinks = [_find(layer, name) for name in consumers]
        linears = [m for m in sinks if isinstance(m, torch.nn.Linear)]
        if source is None or len(linears) != len(consumers):
            continue
        width = linears[0].in_features
        if any(m.in_features != width for m in linears):
            continue
        if isinstance(source, torch.nn.Linear):
            if source.out_features != width:
                continue  # v_proj → o_proj with grouped-query attention: value channels are repeated
        else:
            weight = getattr(source, "weight", None)
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
                continue
        groups.append(ScaleGroup(producer, consumers))
    return groups


@torch.no_grad()
def fold_scales(layer: torch.nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the consumers' weight columns by ``scales`` and divide the producer's output channels by it
    (norm weight, or Linear rows and bias), in place; ``scales`` must be positive and finite."""
    sinks = [weight_of(layer.get_submodule(name)) for name in group.consumers]
    width = sinks[0].shape[1]
    s = scales.detach().to(torch.float64).reshape(-1)
    if s.numel() != width:
        raise ConfigError(f"smoothing scales for {group.consumers[0]}: {s.numel()} values for {width} inputs")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ConfigError(f"smoothing scales for {group.consumers[0]} must be positive and finite")
    for weight in sinks:
        weight.copy_((weight.double() * s).to(weight.dtype))
    source = layer.get_submodule(group.producer)
    weight = weight_of(source)
    if isinstance(source, torch.nn.Linear):
        weight.copy_((weight.double() / s[:, None]).to(weight.dtype))
        if source.bias is not None:
            source.bias.copy_((source.bias.double() / s).to(source.bias.dtype))
    else:
        weight.copy_((weight.double() / s).to(weight.dtype))

def scaled_hessian(hessian: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The input Hessian a consumer sees after :func:`fold_scales`: ``diag(1/s) H diag(1/s)`` (its inputs
    are ``x / s``)."""
    inv = 1.0 / scales.to(hessian.dtype)
    return hessian * inv[:, None] * inv[None, :]


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight`` (a Linear's or a norm's), refused where there is none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(f"{type(module).__name__} has no weight tensor to fold a smoothing scale into")
    return weight


def _find(layer: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None
