"""Write a causal LM as a GGUF file with Q8_0 or Q4_0 weights, streamed one tensor at a time.

:func:`write_gguf` reads a Llama-family Hugging Face directory (``config.json``, ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``, ``tokenizer.json``) or a GGUF file, and writes one GGUF
file that llama.cpp, the ``gguf`` package's ``GGUFReader`` and transformers (``gguf_file=``) load. It never
builds the model: the tensor table is planned from the shards' headers, then each tensor is read, converted
and written before the next is read, so peak memory is about the biggest tensor in float32 plus its
quantized bytes.

- **Weights**: every 2-D matrix whose rows are whole blocks of 32 (all of a Llama's: embeddings,
  projections, ``lm_head``) is stored in ``quant`` (``Q8_0``: an f16 scale and 32 int8 codes per block,
  8.5 bits a weight; ``Q4_0``: an f16 scale and 32 4-bit codes, 4.5 bits a weight), with ``gguf.quants``
  (llama.cpp's reference rounding), except the token embeddings and the output layer (``token_embd``,
  ``output``), which are stored in ``embedding_quant`` (``Q8_0`` unless told): with tied embeddings they
  are the output layer, whose rounding every logit feels (measured on SmolLM2-135M in docs/llm.md;
  llama.cpp's own quantize keeps the output layer at Q6_K in its Q4_0 files). Norm weights stay float32;
  a matrix whose rows are not whole blocks is stored as float16.
- **Layout**: Hugging Face names become llama.cpp's (``gguf.get_tensor_name_map``), and the rows of the
  q/k projections are reordered per head from Hugging Face's rotary layout (halves) to llama.cpp's
  (interleaved pairs); loaders undo it (tested: transformers' logits equal those of the dequantized
  weights). A tied ``lm_head`` is not written: llama.cpp and transformers then use the embeddings.
- **Tokenizer**: a byte-level BPE ``tokenizer.json`` becomes llama.cpp's ``gpt2`` tokenizer (tokens, types,
  merges, special ids, ``add_bos_token``, chat template from ``tokenizer_config.json`` or
  ``chat_template.jinja``); other tokenizers are refused. A GGUF source's metadata, tokenizer included,
  is copied as it is.
- **GGUF source**: each tensor is dequantized (``gguf.quants.dequantize``) and quantized again to
  ``quant`` (``embedding_quant`` for the embeddings and output layer); names and layout are already
  llama.cpp's. Requantizing compounds the two roundings.

The file is written to a temporary sibling, fsynced and renamed into place; an existing output is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nnopt.errors import ConfigError, ModelFormatError, OutputError, UnsupportedModelError, brief
from nnopt.io.atomic import fsync_dir, sibling_name
from nnopt.io.json_file import read_json_document
from nnopt.llm.streaming import peak_rss_bytes

QUANT_TYPES = ("Q8_0", "Q4_0")
BLOCK = 32  # weights per Q8_0/Q4_0 block
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# GGUF architectures whose tensors a GGUF source may have (requantizing does not depend on the architecture).
GGUF_SOURCE_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Rows converted at once: bounds the float temporaries of gguf.quants to tens of MB for any matrix.
_CHUNK_ELEMENTS = 1 << 22
# Keys a GGUF source's metadata has that the writer sets itself.
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version")

ProgressFn = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One output tensor: where it comes from and how it is stored."""

    name: str  # GGUF name
    source: str  # Hugging Face name or GGUF source name
    file: str  # shard file (HF) or "" (GGUF source)
    shape: tuple[int, ...]  # numpy order: (rows, row length)
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # q/k: reorder rows per head, this many heads


def write_gguf(src: str | Path, out_file: str | Path, quant: str = "Q8_0",
               progress: ProgressFn | None = None, *, embedding_quant: str = "Q8_0") -> dict[str, Any]:
    """Write the Llama-family model at ``src`` (a Hugging Face safetensors directory or a ``.gguf`` file) to
    ``out_file`` as GGUF with ``quant`` (``"Q8_0"`` or ``"Q4_0"``) weights; the token embeddings and the
    output layer (``lm_head``, absent when tied) are stored in ``embedding_quant`` (``"Q8_0"``, the default,
    or ``"Q4_0"`` to round them to 4 bits too).

    ``progress(done, total, name)`` is called after each tensor. Returns what was measured and written:
    seconds, peak RSS (``nnopt.llm.streaming.peak_rss_bytes``), source and output bytes, tensor counts per
    type, parameters and the tokenizer model. Bad input raises ConfigError (missing source, unknown quant, unsupported
    tokenizer or config), UnsupportedModelError (not a Llama) or OutputError (``out_file`` exists)."""
    gguf = _gguf()
    start = time.perf_counter()
    if quant not in QUANT_TYPES:
        raise ConfigError(f"GGUF quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    if embedding_quant not in QUANT_TYPES:
        raise ConfigError(f"GGUF embedding quant must be one of {', '.join(QUANT_TYPES)}, got {embedding_quant!r}")
    qtype = _Types(gguf.GGMLQuantizationType[quant], gguf.GGMLQuantizationType[embedding_quant])
    source, out = Path(src), Path(out_file)
    if not source.exists():
        raise ConfigError(f"{source}: no such model directory or .gguf file")
    if out.exists():
        raise OutputError(f"refusing to write {out}: it exists")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such directory for the GGUF output")
    if source.is_dir():
        job: _Job = _HFSource(source, qtype)
    elif source.suffix.lower() == ".gguf":
        job = _GGUFSource(source, qtype)
    else:
        raise ConfigError(f"{source}: not a model directory or a .gguf file")

    tmp = sibling_name(out, "tmp")
    writer = gguf.GGUFWriter(tmp, job.architecture)
    try:
        job.add_metadata(writer)
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{quant}"].value)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in job.plan:
            nbytes = _stored_nbytes(t.shape, t.qtype)
            if _is_quantized(t.qtype):
                shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), nbytes, raw_dtype=t.qtype)
            else:
                writer.add_tensor_info(t.name, t.shape, np.dtype(_NUMPY[t.qtype.name]), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for k, (t, values) in enumerate(job.tensors()):
            writer.write_tensor_data(_encode(values, t.qtype))
            del values
            if progress is not None:
                progress(k + 1, len(job.plan), t.name)
        writer.flush()
        assert writer.fout is not None
        for fh in writer.fout:
            os.fsync(fh.fileno())
        writer.close()
        if out.exists():
            raise OutputError(f"{out} appeared while this output was being written; it was left as it is")
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for t in job.plan:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return {
        "format": f"gguf {quant}",
        "architecture": job.architecture,
        "source": job.description,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
        "source_bytes": job.source_bytes,
        "output_bytes": out.stat().st_size,
        "tensors": counts,
        "parameters": sum(math.prod(t.shape) for t in job.plan),
        "tokenizer": job.tokenizer,
    }


# ----------------------------------------------------------------------------------------------- encoding

_NUMPY = {"F32": np.float32, "F16": np.float16}


def _is_quantized(qtype: Any) -> bool:
    return qtype.name not in _NUMPY


def _stored_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    if not _is_quantized(qtype):
        return math.prod(shape) * np.dtype(_NUMPY[qtype.name]).itemsize
    import gguf

    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def _encode(values: np.ndarray, qtype: Any) -> np.ndarray:
    """``values`` (float32) as the bytes/array GGUF stores for ``qtype``, a chunk of rows at a time."""
    if not _is_quantized(qtype):
        return np.ascontiguousarray(values, dtype=_NUMPY[qtype.name])
    from gguf import quant_shape_to_byte_shape, quants

    rows = values.reshape(-1, values.shape[-1])
    out = np.empty(quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = quants.quantize(np.ascontiguousarray(rows[i:i + step], dtype=np.float32), qtype)
    return out.reshape(quant_shape_to_byte_shape(values.shape, qtype))


# GGUF names of the matrices stored in embedding_quant: the embeddings and the output layer.
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")


@dataclasses.dataclass(frozen=True)
class _Types:
    """The quantized types asked for: ``weights`` for the projections, ``embeddings`` for EMBEDDING_TENSORS."""

    weights: Any  # gguf.GGMLQuantizationType
    embeddings: Any


def _weight_type(name: str, shape: tuple[int, ...], types: _Types) -> Any:
    """How a tensor is stored: a quantized type for matrices of whole blocks (``types.embeddings`` for the
    embeddings and output layer, ``types.weights`` for the others), F16 for other matrices, F32 otherwise."""
    import gguf

    if len(shape) == 2:
        if shape[1] % BLOCK:
            return gguf.GGMLQuantizationType.F16
        return types.embeddings if name in EMBEDDING_TENSORS else types.weights
    return gguf.GGMLQuantizationType.F32


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q/k projection's rows from Hugging Face's rotary layout (each head's first half pairs with
    its second half) to llama.cpp's (adjacent rows pair): per head, rows ``[0..d/2) , [d/2..d)`` interleave."""
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ConfigError(f"a q/k projection with {rows} rows does not split into {heads} heads of even size")
    out: np.ndarray = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
    return out.reshape(weight.shape)


# ------------------------------------------------------------------------------------------------ sources

class _Job:
    architecture: str
    description: str
    plan: list[_Planned]
    source_bytes: int
    tokenizer: str | None

    def add_metadata(self, writer: Any) -> None:
        raise NotImplementedError

    def tensors(self) -> Iterator[tuple[_Planned, np.ndarray]]:
        raise NotImplementedError


class _HFSource(_Job):
    """A Llama-family Hugging Face directory of safetensors shards."""

    def __init__(self, root: Path, qtype: _Types) -> None:
        self.root = root
        self.architecture = "llama"
        config_path = root / "config.json"
        config = read_json_document(config_path, ConfigError,
                                    f"{root}: no config.json (not a Hugging Face model directory)",
                                    f"{config_path}: unreadable")
        if not isinstance(config, dict):
            raise ConfigError(f"{config_path}: not a JSON object")
        self.config = config
        model_type = config.get("model_type")
        if model_type != "llama":
            raise UnsupportedModelError(f"{config_path}: model_type {model_type!r}: GGUF output supports Llama-family "
                                        "models (model_type 'llama': Llama, SmolLM, TinyLlama) from a directory")
        self._check_config()
        files = self._shard_files()
        self.description = f"safetensors: {root} ({len(files)} file{'s' * (len(files) > 1)})"
        self.source_bytes = sum((root / f).stat().st_size for f in files)
        self.plan = self._plan(files, qtype)
        self.tokenizer = "gpt2"

    def _int(self, key: str) -> int:
        value = self.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{self.root / 'config.json'}: {key} must be a positive integer, got {value!r}")
        return value

    def _check_config(self) -> None:
        c = self.config
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            self._int(key)
        heads = self._int("num_attention_heads")
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        where = f"{self.root / 'config.json'}"
        if head_dim * heads != c["hidden_size"]:  # llama.cpp's Llama derives head_dim from these two
            raise ConfigError(f"{where}: head_dim {head_dim} × {heads} heads ≠ hidden_size {c['hidden_size']}")
        if not isinstance(kv_heads, int) or heads % kv_heads:
            raise ConfigError(f"{where}: num_key_value_heads {kv_heads!r} does not divide {heads} heads")
        # transformers 4 writes rope_scaling, transformers 5 rope_parameters: either may carry a scaling type
        for key in ("rope_scaling", "rope_parameters"):
            rope = c.get(key) or {}
            if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ConfigError(f"{where}: {key} {rope!r} is not written to GGUF by nnopt yet")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ConfigError(f"{where}: attention/MLP biases are not written to GGUF by nnopt yet")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {c.get('hidden_act')!r}: llama.cpp's Llama uses silu")

    def _shard_files(self) -> list[str]:
        from nnopt.llm.source import safetensors_files

        return safetensors_files(self.root)

    def _plan(self, files: list[str], qtype: _Types) -> list[_Planned]:
        import gguf
        from safetensors import SafetensorError, safe_open

        c = self.config
        layers = c["num_hidden_layers"]
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        tied = bool(c.get("tie_word_embeddings", False))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
        found: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in files:
            try:
                with safe_open(str(self.root / file), framework="numpy") as fh:
                    for key in fh.keys():
                        found[key] = (file, tuple(fh.get_slice(key).get_shape()))
            except (OSError, ValueError, SafetensorError) as exc:
                raise ModelFormatError(f"{self.root / file}: not a readable safetensors file: {brief(exc)}") from None
        plan: list[_Planned] = []
        for key in sorted(found, key=_hf_order):
            file, shape = found[key]
            if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and tied):
                continue  # recomputed by loaders / the embeddings serve as the output layer
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UnsupportedModelError(f"{self.root}: tensor {key} has no llama.cpp name (not a plain Llama)")
            permute = heads if key.endswith("self_attn.q_proj.weight") else (
                kv_heads if key.endswith("self_attn.k_proj.weight") else 0)
            plan.append(_Planned(name, key, file, shape, _weight_type(name, shape, qtype), permute))
        if not any(t.name == "token_embd.weight" for t in plan):
            raise ConfigError(f"{self.root}: no model.embed_tokens.weight among the tensors")
        return plan

    def tensors(self) -> Iterator[tuple[_Planned, np.ndarray]]:
        import torch
        from safetensors import safe_open

        for t in self.plan:
            # The file is opened per tensor: its memory map, and the pages read through it, go when it closes,
            # so resident memory stays about one tensor rather than growing to a whole shard.
            with safe_open(str(self.root / t.file), framework="pt") as fh:
                # float32 through torch (numpy has no bfloat16); a private copy, not a view of the map.
                values = fh.get_tensor(t.source).to(torch.float32).numpy().copy()
            if t.permute_heads:
                values = permute_rotary_rows(values, t.permute_heads)
            yield t, values

    def add_metadata(self, writer: Any) -> None:
        c = self.config
        heads = c["num_attention_heads"]
        writer.add_name(str(c.get("_name_or_path") or self.root.name))
        writer.add_context_length(self._int("max_position_embeddings"))
        writer.add_embedding_length(c["hidden_size"])
        writer.add_block_count(c["num_hidden_layers"])
        writer.add_feed_forward_length(c["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(c.get("num_key_value_heads") or heads)
        writer.add_rope_dimension_count(c["hidden_size"] // heads)
        writer.add_rope_freq_base(float(_rope_theta(c)))
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(c["vocab_size"])
        _add_bpe_tokenizer(writer, self.root, c)


def _rope_theta(config: dict[str, Any]) -> float:
    theta = config.get("rope_theta")
    if theta is None and isinstance(config.get("rope_parameters"), dict):  # transformers 5 writes it here
        theta = config["rope_parameters"].get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _hf_order(key: str) -> tuple[int, int, str]:
    """Embeddings first, then the layers in order, then the final norm and lm_head (llama.cpp's order)."""
    parts = key.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]), key)
    return (0 if "embed_tokens" in key else 2, 0, key)


class _GGUFSource(_Job):
    """A GGUF file: its tensors dequantized and quantized again, its metadata copied."""

    def __init__(self, path: Path, qtype: _Types) -> None:
        import gguf

        try:
            self.reader = gguf.GGUFReader(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable GGUF file: {brief(exc)}") from None
        field = self.reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
        if architecture not in GGUF_SOURCE_ARCHITECTURES:
            raise UnsupportedModelError(f"{path}: GGUF architecture {architecture!r}: requantizing supports "
                                        f"{', '.join(GGUF_SOURCE_ARCHITECTURES)}")
        self.architecture = str(architecture)
        self.description = f"gguf: {path}"
        self.source_bytes = path.stat().st_size
        model = self.reader.fields.get("tokenizer.ggml.model")
        self.tokenizer = str(model.contents()) if model is not None else None
        self.plan = []
        for t in self.reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (row length) first
            self.plan.append(_Planned(t.name, t.name, "", shape, _weight_type(t.name, shape, qtype)))

    def add_metadata(self, writer: Any) -> None:
        import gguf

        for key, field in self.reader.fields.items():
            # general.alignment: GGUFWriter pads to its own alignment, which a copied field would contradict
            if key.startswith("GGUF.") or key in _OWN_KEYS or key == "general.alignment":
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                if len(field.types) != 2:
                    raise ModelFormatError(f"GGUF field {key}: nested arrays are not copied by nnopt")
                writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[1])
            else:
                writer.add_key_value(key, field.contents(), vtype)

    def tensors(self) -> Iterator[tuple[_Planned, np.ndarray]]:
        from gguf import quants

        for t, tensor in zip(self.plan, self.reader.tensors, strict=True):
            data = np.asarray(tensor.data)  # a view of the memory-mapped file: (rows, bytes or values per row)
            rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)
            values = np.empty((rows.shape[0], t.shape[-1] if t.shape else 1), dtype=np.float32)
            step = max(1, _CHUNK_ELEMENTS // max(1, values.shape[1]))
            for i in range(0, rows.shape[0], step):  # a chunk at a time: dequantize's temporaries stay small
                values[i:i + step] = quants.dequantize(rows[i:i + step], tensor.tensor_type)
            yield t, values.reshape(t.shape)


# ---------------------------------------------------------------------------------------------- tokenizer

def _add_bpe_tokenizer(writer: Any, root: Path, config: dict[str, Any]) -> None:
    """llama.cpp's ``gpt2`` tokenizer from a byte-level BPE ``tokenizer.json``; anything else is refused."""
    import gguf

    path = root / "tokenizer.json"
    doc = read_json_document(path, ConfigError, f"{root}: no tokenizer.json (GGUF files carry the tokenizer)",
                             f"{path}: unreadable")
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConfigError(f"{path}: GGUF output supports byte-level BPE tokenizers, this one is "
                          f"{(model or {}).get('type')!r}")
    pre = _pre_tokenizer_name(doc.get("pre_tokenizer"), path)
    if doc.get("normalizer") is not None:
        raise ConfigError(f"{path}: a tokenizer with a normalizer has no llama.cpp gpt2 equivalent")
    vocab: dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
    added = {int(a["id"]): a for a in doc.get("added_tokens") or []}
    for token_id, a in added.items():
        vocab.setdefault(str(a["content"]), token_id)
    size = max(int(config["vocab_size"]), max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * size
    for token, token_id in vocab.items():
        tokens[token_id] = token
    types = []
    for i, slot in enumerate(tokens):
        if slot is None:  # the embedding has more rows than the tokenizer has tokens
            tokens[i] = f"[PAD{i}]"
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([str(t) for t in tokens])
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    tokenizer_config: dict[str, Any] = {}
    config_path = root / "tokenizer_config.json"
    if config_path.is_file():
        loaded = read_json_document(config_path, ConfigError, f"{config_path}: missing", f"{config_path}: unreadable")
        tokenizer_config = loaded if isinstance(loaded, dict) else {}
    lookup = {str(t): i for i, t in enumerate(tokens)}
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        named: Any = tokenizer_config.get(f"{role}_token")
        if isinstance(named, dict):
            named = named.get("content")
        special_id = lookup.get(named) if isinstance(named, str) else config.get(f"{role}_token_id")
        if isinstance(special_id, int) and not isinstance(special_id, bool):
            add(special_id)
    if isinstance(tokenizer_config.get("add_bos_token"), bool):
        writer.add_add_bos_token(tokenizer_config["add_bos_token"])
    else:  # llama.cpp adds BOS unless told; a byte-level BPE tokenizer without the flag adds none
        writer.add_add_bos_token(False)
    template = tokenizer_config.get("chat_template")
    if not isinstance(template, str) and (root / "chat_template.jinja").is_file():  # transformers 5 saves it here
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)


def _pre_tokenizer_name(pre: Any, path: Path) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the split a byte-level BPE tokenizer does before BPE."""
    def byte_level(p: Any) -> bool:
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True) is True

    if byte_level(pre) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # llama.cpp's name (its loader refuses "gpt2", which is the tokenizer model's name)
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
                and byte_level(steps[1]) and not steps[1].get("add_prefix_space", False)):
            return "smollm"  # SmolLM/SmolLM2: digits one by one, then GPT-2's split
    raise ConfigError(f"{path}: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name known to nnopt "
                      "(supported: GPT-2's byte-level split, with or without single digits first)")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF output needs the gguf package: pip install 'nnopt[llm]'") from None
    return gguf
