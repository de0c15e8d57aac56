"""Llama-shaped causal LMs with random weights, written as Hugging Face directories (config.json plus
sharded safetensors), for measuring memory and speed at the scale of real models without downloading one.

The writer never holds the model: it plans the shards from the shapes alone, then generates and saves one
shard at a time (peak memory ≈ one shard). Every tensor is drawn from its own generator seeded by
``(seed, tensor index)``, so its values do not depend on the shard size. Weights are N(0, 0.02²) like a
fresh Llama's initialisation; norms are ones.

>>> import tempfile, pathlib
>>> info = write_synthetic_llama(pathlib.Path(tempfile.mkdtemp()) / "tiny", "tiny")
>>> info["parameters"] > 0 and info["shards"] >= 1
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ConfigError
from nnopt.io.atomic import atomic_directory

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
INIT_STD = 0.02  # LlamaConfig.initializer_range


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """The sizes that fix a Llama checkpoint's tensors (names follow LlamaConfig's fields)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    dtype: str = "float32"  # "float32" or "bfloat16": the dtype of every tensor written
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor's name and shape, in Hugging Face's order (embeddings, layers, norm, head)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", (self.vocab_size, h)))
        return out

    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config(self) -> dict[str, Any]:
        """config.json as transformers' LlamaConfig writes it (the fields a loader reads)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": INIT_STD,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": self.tie_word_embeddings, "use_cache": True,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": self.dtype,
        }


PRESETS: dict[str, LlamaShape] = {
    # For tests: every tensor kind of the real ones, a few KB.
    "tiny": LlamaShape(64, 176, 2, 4, 2, 256, "float32", max_position_embeddings=128),
    # TinyLlama-1.1B's shape, 1.10e9 parameters, 4.4 GB in fp32.
    "1.1b": LlamaShape(2048, 5632, 22, 32, 4, 32000, "float32"),
    # Llama-2-7B's shape, 6.74e9 parameters, 13.5 GB in bf16.
    "7b": LlamaShape(4096, 11008, 32, 32, 32, 32000, "bfloat16", max_position_embeddings=4096),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shape_of(preset: str | LlamaShape) -> LlamaShape:
    if isinstance(preset, LlamaShape):
        shape = preset
    elif preset in PRESETS:
        shape = PRESETS[preset]
    else:
        raise ConfigError(f"unknown synthetic model preset {preset!r}; known: {', '.join(PRESETS)}")
    if shape.dtype not in _DTYPES:
        raise ConfigError(f"synthetic model dtype must be one of {', '.join(_DTYPES)}, got {shape.dtype!r}")
    if shape.hidden_size % shape.num_attention_heads or shape.num_attention_heads % shape.num_key_value_heads:
        raise ConfigError("synthetic model: heads must divide hidden_size and kv heads must divide heads")
    return shape


def plan_shards(shape: LlamaShape, shard_bytes: int) -> list[list[tuple[int, str, tuple[int, ...]]]]:
    """Tensors (index, name, shape) per shard: consecutive tensors until the next would pass ``shard_bytes``."""
    if shard_bytes < 1:
        raise ConfigError(f"shard_bytes must be positive, got {shard_bytes}")
    itemsize = _DTYPES[shape.dtype].itemsize
    shards: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for index, (name, dims) in enumerate(shape.tensors()):
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((index, name, dims))
        size += nbytes
    return shards


def _tensor(name: str, dims: tuple[int, ...], index: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if len(dims) == 1:  # RMSNorm weights start at one
        return torch.ones(dims, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    # Drawn in fp32 (bf16 has no normal_ on every torch), converted once.
    return torch.empty(dims, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator).to(dtype)


def _generate(shard: list[tuple[int, str, tuple[int, ...]]], seed: int, dtype: torch.dtype) -> Iterator[
        tuple[str, torch.Tensor]]:
    for index, name, dims in shard:
        yield name, _tensor(name, dims, index, seed, dtype)


def write_synthetic_llama(
    out_dir: str | Path, preset: str | LlamaShape = "tiny", *, seed: int = 0, shard_bytes: int = 2 << 30,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write a Llama-shaped model with random weights to ``out_dir`` (created atomically; must not exist).

    One shard is generated, saved and dropped before the next (``progress(done, total)`` after each).
    More than one shard gets ``model.safetensors.index.json``; one is ``model.safetensors``.
    Returns the shape, parameter count, shard count and bytes written.
    """
    from safetensors.torch import save_file

    shape = _shape_of(preset)
    dtype = _DTYPES[shape.dtype]
    shards = plan_shards(shape, shard_bytes)
    total = len(shards)
    names = [SINGLE_FILE] if total == 1 else [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
    weight_map: dict[str, str] = {}
    written = 0
    with atomic_directory(Path(out_dir), manifest=False) as tmp:
        for k, (shard, file_name) in enumerate(zip(shards, names, strict=True)):
            tensors = dict(_generate(shard, seed, dtype))
            save_file(tensors, str(tmp / file_name), metadata={"format": "pt"})
            written += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, file_name))
            del tensors
            if progress is not None:
                progress(k + 1, total)
        if total > 1:
            index = {"metadata": {"total_size": written}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    return {
        "preset": preset if isinstance(preset, str) else "custom", "shape": dataclasses.asdict(shape),
        "parameters": shape.parameters(), "shards": total, "tensor_bytes": written, "seed": seed,
    }
