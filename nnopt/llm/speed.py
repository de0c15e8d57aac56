"""Tokens per second of a causal LM on the CPU, and how close batch-1 decode comes to the memory's limit.

- **Decode** (:func:`compare_decode`): batch 1 with a KV cache. A prompt of ``prompt_tokens`` random ids
  is prefilled (untimed), then ``new_tokens`` single-token greedy steps (``model(input_ids=..., cache=...,
  use_cache=True)`` + argmax; ``past_key_values=`` before transformers 5) are timed; tokens/s = steps ÷
  seconds. Several models are alternated round by round after a warm-up round each, so a burst of load
  from elsewhere falls on all of them alike; the median over rounds is quoted.
- **Prefill** (:func:`compare_prefill`): one forward pass over ``tokens`` (512) random ids from an empty
  cache; tokens/s = tokens ÷ seconds, median over alternated rounds.
- **Copy bandwidth** (:func:`copy_bandwidth`): STREAM's "copy" on the same torch threads: ``dst.copy_(src)``
  of two float32 tensors much larger than the caches; bytes read + written (2 × size) ÷ seconds, median.
- **Bandwidth fraction** = :func:`weight_bytes_per_token` × tokens/s ÷ copy bandwidth. Decode at batch 1
  reads every weight once per token, so this is the share of the measured bandwidth that weight traffic
  achieves (KV-cache, activation and norm traffic are not counted: small at short contexts).
  Weight bytes per token: every Linear's weight and bias in their stored precision (a weight-only layer's
  codes, scales and zero points; ``lm_head`` included, even when tied to the embeddings), plus one row of
  each Embedding (a lookup is a gather).

Weight-only variants (:func:`quantized_copy`) share every tensor but the Linear layers' with the source
model, and :func:`choose_kernels` picks, per layer shape and by measurement on this CPU, the faster of
nnopt's weight-only paths (torch's int8/int4 kernels with bf16 activations, or dequantize + fp32 GEMM),
timing all of a shape's layers in turn (so their weights stream from memory as in decode, not from cache).

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
...                   num_key_value_heads=1, vocab_size=64)
>>> model = LlamaForCausalLM(cfg).eval()
>>> rates = compare_decode({"fp32": model}, new_tokens=4, rounds=1)
>>> rates["fp32"].median > 0
True
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError

DEFAULT_COPY_BYTES = 256 << 20  # per tensor; far above any CPU's last-level cache
EVICT_BYTES = 128 << 20  # read before each timed pass of choose_kernels, so weights start out of cache


@dataclasses.dataclass(frozen=True)
class Rate:
    """A measured rate (tokens/s or bytes/s): median and 10th/90th percentiles over rounds."""

    median: float
    p10: float
    p90: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Rate:
        ordered = sorted(samples)
        pick = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]  # noqa: E731
        return cls(statistics.median(ordered), pick(0.1), pick(0.9), tuple(samples))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if not isinstance(size, int) or size < 1:
        raise ConfigError("the model has no config.vocab_size: pass a Hugging Face causal LM")
    return size


def _check_models(models: Mapping[str, nn.Module]) -> None:
    if not models:
        raise ConfigError("no models to time")
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{name!r} is not a torch module")
        model.eval()


def random_prompt(model: nn.Module, tokens: int, seed: int = 0) -> torch.Tensor:
    """``(1, tokens)`` token ids drawn uniformly from the model's vocabulary (speed does not depend on them)."""
    _check_positive(tokens=tokens)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, _vocab_size(model), (1, tokens), generator=generator)


def _decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Greedy decode with a KV cache: (the ``steps + 1`` new tokens, seconds of the ``steps`` cached steps)."""
    # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still works, with a warning).
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out[key], out.logits[:, -1:].argmax(-1)
        tokens = [token]
        started = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            cache, token = out[key], out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        seconds = time.perf_counter() - started
    return torch.cat(tokens, dim=1), seconds


def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The ``new_tokens`` greedy continuation of ``prompt`` (shape (1, n)) by the loop :func:`compare_decode` times."""
    _check_positive(new_tokens=new_tokens)
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1 or prompt.dtype != torch.long:
        raise ConfigError(f"prompt must be int64 token ids of shape (1, n ≥ 1), got {tuple(prompt.shape)} "
                          f"{prompt.dtype}")
    return _decode(model, prompt, new_tokens - 1)[0]


def compare_decode(
    models: Mapping[str, nn.Module], *, prompt_tokens: int = 16, new_tokens: int = 32, rounds: int = 3,
    warmup: int = 1, seed: int = 0,
) -> dict[str, Rate]:
    """Batch-1 decode tokens/s of each model (timed single-token steps after an untimed prompt prefill),
    alternated over ``rounds`` after ``warmup`` rounds each; see the module docstring."""
    _check_positive(prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=rounds)
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup!r}")
    _check_models(models)
    prompt = random_prompt(next(iter(models.values())), prompt_tokens, seed)
    for model in models.values():
        for _ in range(warmup):
            _decode(model, prompt, min(new_tokens, 4))
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            _, seconds = _decode(model, prompt, new_tokens)
            samples[name].append(new_tokens / seconds)
    return {name: Rate.of(values) for name, values in samples.items()}


def compare_prefill(
    models: Mapping[str, nn.Module], *, tokens: int = 512, rounds: int = 3, warmup: int = 1, seed: int = 0,
) -> dict[str, Rate]:
    """Prefill tokens/s: one forward pass over ``tokens`` ids from an empty cache, alternated over rounds."""
    _check_positive(tokens=tokens, rounds=rounds)
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup!r}")
    _check_models(models)
    prompt = random_prompt(next(iter(models.values())), tokens, seed)

    def once(model: nn.Module) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            model(input_ids=prompt, use_cache=True)
            return time.perf_counter() - started

    for model in models.values():
        for _ in range(warmup):
            once(model)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(tokens / once(model))
    return {name: Rate.of(values) for name, values in samples.items()}


def copy_bandwidth(nbytes: int = DEFAULT_COPY_BYTES, rounds: int = 7, warmup: int = 2) -> Rate:
    """STREAM-style copy bandwidth in bytes/s on torch's current threads: ``dst.copy_(src)`` of two float32
    tensors of ``nbytes`` each, counting ``2 × nbytes`` (read + write) per copy; median over ``rounds``."""
    _check_positive(nbytes=nbytes, rounds=rounds)
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup!r}")
    elements = max(1, nbytes // 4)
    src = torch.rand(elements)
    dst = torch.empty_like(src)  # touched by the warm-up copies before any is timed
    for _ in range(max(1, warmup)):
        dst.copy_(src)
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        dst.copy_(src)
        samples.append(2 * elements * 4 / (time.perf_counter() - started))
    return Rate.of(samples)


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: each Linear's weight and bias as stored (a weight-only
    layer's codes, scales and zero points), ``lm_head`` included even when tied, plus one row per Embedding."""
    from nnopt.layers.weight_only import QuantizedEmbedding, QuantizedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += _tensor_bytes(module.weight, module.bias)
        elif isinstance(module, QuantizedLinear):
            total += sum(_tensor_bytes(t) for t in module._sources()) + _tensor_bytes(module.bias)
        elif isinstance(module, nn.Embedding):
            total += module.embedding_dim * module.weight.element_size()
        elif isinstance(module, QuantizedEmbedding):  # one row of codes and its share of the scales
            codes = module.embedding_dim // 2 if module.packed else module.embedding_dim
            total += codes + _tensor_bytes(module.weight_scale) // max(1, module.num_embeddings)
    return total


def bandwidth_fraction(weight_bytes: int, tokens_per_s: float, bandwidth_bytes_per_s: float) -> float:
    """The share of the measured copy bandwidth that decode's weight reads achieve."""
    if weight_bytes < 0 or tokens_per_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ConfigError("weight bytes must be >= 0, tokens/s and bandwidth > 0")
    return weight_bytes * tokens_per_s / bandwidth_bytes_per_s


def quantized_copy(model: nn.Module, config: Any, *, include_lm_head: bool = True) -> nn.Module:
    """A copy of ``model`` whose Linear layers are nnopt weight-only layers quantized with ``config`` (a
    :class:`~nnopt.quantization.weights.WeightQuantConfig`); every other tensor (embeddings, norms) is shared
    with ``model``, which is left unchanged. ``include_lm_head=False`` keeps ``lm_head`` float."""
    from nnopt.quantization.weights import WeightQuantConfig, quantize_weights

    if not isinstance(config, WeightQuantConfig):
        raise ConfigError(f"config must be a WeightQuantConfig, got {type(config).__name__}")
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear
               and (include_lm_head or name.rsplit(".", 1)[-1] != "lm_head")]
    if not linears:
        raise ConfigError("the model has no nn.Linear layers to quantize")
    # Quantize in a holder so that the source model keeps its layers; then copy the model's structure with
    # the quantized layers in place of its Linears and every other tensor shared.
    holder = nn.ModuleDict({str(i): m for i, (_, m) in enumerate(linears)})
    quantize_weights(holder, config)
    memo: dict[int, Any] = {id(m): holder[str(i)] for i, (_, m) in enumerate(linears)}
    for tensor in [*model.parameters(), *model.buffers()]:
        memo.setdefault(id(tensor), tensor)
    return copy.deepcopy(model, memo)


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """One layer shape's measured paths at batch 1 (ms for its timed layers in turn) and the path chosen."""

    shape: tuple[int, int]
    layers: int  # layers of this shape (all get the chosen path)
    ms: dict[str, float]  # "fp32" (the source's Linears), "kernel" (int8/int4pack), "dequantize"
    kernel_name: str  # "int4pack_mm", "int8pack_mm" or "dequantize"
    chosen: str  # "kernel" or "dequantize"
    timed_layers: int = 0  # how many of them were timed

    @property
    def slower_than_fp32(self) -> bool:
        return self.ms[self.chosen] > self.ms["fp32"]


def choose_kernels(
    source: nn.Module, quantized: nn.Module, rounds: int = 3, max_layers: int | None = None
) -> list[KernelChoice]:
    """Per Linear shape, time at batch 1 every path the quantized layers can take, set each layer's
    ``compute`` to the fastest, and return what was measured (the source model's fp32 Linears timed the same
    way beside them). Each timed pass runs all of the shape's layers one after another after evicting the
    caches (a 128 MiB buffer rewritten), so weights come from memory as in decode; the paths alternate over
    ``rounds`` after a warm-up round (which also builds the kernels' weights). ``max_layers`` times only the
    first that many layers of each shape (the choice still applies to all): a bound on the time spent on
    large models, whose dequantize path is slow."""
    from nnopt.layers.weight_only import QuantizedLinear

    _check_positive(rounds=rounds)
    if max_layers is not None:
        _check_positive(max_layers=max_layers)
    float_layers = {n: m for n, m in source.named_modules() if type(m) is nn.Linear}
    groups: dict[tuple[int, int], list[tuple[nn.Linear, QuantizedLinear]]] = {}
    for name, layer in quantized.named_modules():
        if isinstance(layer, QuantizedLinear) and name in float_layers:
            groups.setdefault((layer.out_features, layer.in_features), []).append((float_layers[name], layer))
    if not groups:
        raise ConfigError("the quantized model has no weight-only Linear layers matching the source's")
    flush = torch.zeros(EVICT_BYTES // 4)
    choices = []
    for shape, pairs in groups.items():
        x = torch.randn(1, shape[1])
        timed = pairs[:max_layers] if max_layers is not None else pairs
        paths: dict[str, list[Any]] = {"fp32": [f for f, _ in timed]}
        for q in (q for _, q in pairs):
            q.compute = "kernel"
        kernel_name = pairs[0][1].compute_path
        if kernel_name != "dequantize":
            paths["kernel"] = [q for _, q in timed]
        paths["dequantize"] = [q for _, q in timed]
        ms: dict[str, list[float]] = {p: [] for p in paths}
        with torch.inference_mode():
            for _ in range(rounds + 1):  # the first round warms up (builds the kernels' weights)
                for path, layers in paths.items():
                    for q in layers:
                        if isinstance(q, QuantizedLinear):
                            q.compute = path
                    _evict_caches(flush)
                    started = time.perf_counter()
                    for layer in layers:
                        layer(x)
                    ms[path].append((time.perf_counter() - started) * 1e3)
        medians = {p: statistics.median(v[1:]) for p, v in ms.items()}
        chosen = min(("kernel", "dequantize"), key=lambda p: medians.get(p, float("inf")))
        for _, q in pairs:
            q.compute = chosen
        choices.append(KernelChoice(shape, len(pairs), medians, kernel_name, chosen, len(timed)))
    return choices


def _evict_caches(flush: torch.Tensor) -> None:
    flush.add_(1.0)  # reads and writes every line: what the layers then read comes from memory


def bf16_copy(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of ``model`` (refused where the CPU would emulate bf16: see :func:`nnopt.cpu.bf16_support`)."""
    from nnopt.cpu import require_native_bf16

    require_native_bf16("bf16 decode")
    return copy.deepcopy(model).to(torch.bfloat16)
