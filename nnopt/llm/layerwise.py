"""Layer-by-layer calibration of a Llama-family checkpoint that is never held whole (GPTQ on top of it).

:func:`quantize_checkpoint_layerwise` embeds the calibration windows (token ids; by default the shipped
calibration text, :func:`nnopt.llm.corpus.calibration_text`, never the evaluation text), then for each
decoder layer ``i``, in order:

1. builds that one layer (transformers' decoder-layer class for the config's ``model_type``, e.g.
   ``LlamaDecoderLayer(config, i)``, on the meta device, then loaded from the safetensors shards),
2. runs the carried hidden states through it with forward hooks on its Linear modules that accumulate each
   input's Hessian ``H = 2 XᵀX / n`` over every calibration token (float64; modules fed the same tensor,
   q/k/v and gate/up, share one),
3. hands the layer, its selected Linears and their input statistics (``H`` and the per-channel ``max |x|``,
   :class:`InputStats`) to the method, which returns codes in the writer's layout and may change the layer
   (fold smoothing scales into norms, zero pruned weights); a per-matrix algorithm (GPTQ:
   :func:`nnopt.llm.gptq.gptq_codes`) gets each weight and its ``H`` through :func:`per_matrix`,
4. puts the dequantized codes into the layer and runs the calibration inputs through the *quantized* layer:
   its outputs are layer ``i + 1``'s inputs, as in GPTQ, so later layers correct for earlier layers' errors,
5. frees the layer.

The output goes through :func:`nnopt.llm.streaming.write_quantized_checkpoint` (the same compressed-tensors
writer as RTN), one output shard per decoder layer. After each layer the carried hidden states are saved in
the partial directory (``carried-<i>.safetensors``: the inputs of layer ``i``), so a killed run continues from
its last finished layer.

Peak memory is not the model's but one layer's: the layer in float32 (its source tensors become its
parameters without a copy where they are float32), its Hessians (float64, ``in²`` each: 242 MiB for a
5632-input down_proj, about half of it resident during the calibration passes, whose upper triangles alone
are accumulated), one batch's activations, the carried hidden states (``windows × window × hidden × 4``
bytes) and the embedding rows of the calibration tokens (not the table). GPTQ inverts each Hessian once, in
its own memory, for all the matrices that share it, frees it after the last of them and drops each float32
weight once it holds the float64 copy it works on (:func:`nnopt.llm.gptq.hessian_inverse`); freed heap
memory is handed back to the system after each batch and step (glibc ``malloc_trim``). Measured on a
TinyLlama-1.1B-shaped fp32 checkpoint (4.4 GB): ``benchmarks/llm_memory.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import re
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.llm import streaming
from nnopt.llm.gptq import GPTQConfig, HessianInverse, gptq_codes_from_inverse, hessian_inverse
from nnopt.quantization.weights import WeightQuantConfig

CARRIED = "carried-{}.safetensors"
# model types whose decoder layers take (hidden, attention_mask, position_embeddings) with rotary embeddings
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_EMBED = "model.embed_tokens.weight"
_TILE = 512  # columns of X handled at a time when accumulating XᵀX

Codes = streaming.Codes
# (full weight name, float32 weight (out, in), float64 Hessian (in, in)) -> codes in rtn_codes' layout
LayerAlgorithm = Callable[[str, torch.Tensor, torch.Tensor], Codes]


@dataclasses.dataclass
class InputStats:
    """What calibration saw at one Linear's input over every calibration token: ``hessian`` ``2 XᵀX / n``
    (float64, (in, in)), ``absmax`` ``max |x_j|`` per input channel (float32, (in,)) and ``tokens`` ``n``.
    Linears fed the same tensor (q/k/v, gate/up) share one object."""

    hessian: torch.Tensor
    absmax: torch.Tensor
    tokens: int


@dataclasses.dataclass
class LayerContext:
    """One decoder layer as a :data:`LayerMethod` gets it: ``layer`` (float32, built alone, its parameters
    the method may change in place, e.g. to fold a smoothing scale into a norm or zero pruned weights),
    ``linears`` (the chosen ``*.weight`` names and their modules), ``stats`` (each one's :class:`InputStats`
    from the unchanged layer), ``inputs`` (the carried hidden states, not to be changed) and ``forward``
    (the layer as it is now on some hidden states, batched, returning its outputs)."""

    unit: str
    layer: torch.nn.Module
    linears: dict[str, torch.nn.Linear]
    stats: dict[str, InputStats]
    config: WeightQuantConfig
    inputs: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor]


# Returns codes for chosen weights (those it leaves out are RTN-quantized from their modules' weights as the
# method left them, or written as they are when nothing is quantized); every tensor of the layer it changed
# is written from the layer.
LayerMethod = Callable[[LayerContext], dict[str, Codes]]
# Sums (hessian = XᵀX, not yet scaled by 2/n), absmax and token counts of this process, reduced in place
# across processes (nnopt.llm.distributed); called with the same names in the same order everywhere.
StatsReducer = Callable[[dict[str, InputStats]], None]


def per_matrix(algorithm: LayerAlgorithm) -> LayerMethod:
    """A :data:`LayerMethod` that hands each chosen weight and its Hessian to ``algorithm`` (GPTQ)."""

    def method(context: LayerContext) -> dict[str, Codes]:
        return {name: algorithm(name, module.weight.detach().float(), context.stats[name].hessian)
                for name, module in context.linears.items()}

    return method


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Calibration windows: ``windows`` consecutive windows of ``window`` tokens of the calibration text,
    run ``batch`` windows at a time."""

    windows: int = 32
    window: int = 512
    batch: int = 4

    def validate(self) -> None:
        for field in ("windows", "window", "batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CalibrationConfig.{field}: must be a positive integer, got {value!r}")
        if self.window < 2:
            raise ConfigError(f"CalibrationConfig.window: must be at least 2 tokens, got {self.window}")


def quantize_checkpoint_gptq(
    src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, *, gptq: GPTQConfig | None = None,
    calibration: CalibrationConfig | None = None, tokens: torch.Tensor | None = None,
    progress: streaming.ProgressFn | None = None, include_lm_head: bool = False,
    shard_bytes: int = streaming.DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """GPTQ-quantize a Hugging Face safetensors checkpoint to ``out_dir`` layer by layer (compressed-tensors,
    as :func:`nnopt.llm.streaming.quantize_checkpoint_rtn` writes). ``tokens``: ``(k, window)`` calibration
    token ids; by default the calibration text through the checkpoint's tokenizer, cut as ``calibration``
    says. ``lm_head`` (with ``include_lm_head``) is quantized with RTN: its inputs are not carried. Returns the
    writer's figures (seconds, peak RSS, ...) plus the calibration tokens and windows."""
    gptq = gptq or GPTQConfig()
    config.validate()
    gptq.validate(config)
    return quantize_checkpoint_layerwise(
        src_dir, out_dir, config, layer_method=_GPTQMethod(config, gptq), method="nnopt-gptq",
        settings={"gptq": dataclasses.asdict(gptq)}, calibration=calibration, tokens=tokens, progress=progress,
        include_lm_head=include_lm_head, shard_bytes=shard_bytes)


class _GPTQMethod:
    """:func:`per_matrix` with :func:`nnopt.llm.gptq.gptq_codes`, the same codes, in less memory: each
    Hessian's inverse factor is computed once, in the Hessian's own memory, for all the matrices fed the same
    inputs (q/k/v, gate/up), and freed after the last of them; each float32 weight goes once GPTQ holds its
    float64 copy. The engine leaves the Hessians' lower triangles to it (``upper_only``): each is written just
    before its inverse, so that until then about half of a Hessian is resident. The peak holds one down_proj
    Hessian (in², float64) instead of it, a copy and the other Hessians, and no float32 weight beside its
    float64 copy."""

    upper_only = True

    def __init__(self, config: WeightQuantConfig, gptq: GPTQConfig) -> None:
        self.config, self.gptq = config, gptq

    def __call__(self, context: LayerContext) -> dict[str, Codes]:
        stats = context.stats  # the engine's own dict: nothing reads the statistics after the method
        last = {id(stats[name]): name for name in context.linears}
        inverses: dict[int, HessianInverse] = {}
        result: dict[str, Codes] = {}
        for name, module in context.linears.items():
            entry = stats[name]
            key = id(entry)
            if key not in inverses:
                _mirror_upper(entry.hessian)  # (already symmetric where the engine wrote it whole)
                inverses[key] = hessian_inverse(entry.hessian, self.gptq, consume=True)
            # The engine puts the dequantized codes in the float32 weight's place (nothing runs the layer
            # before that): it goes as soon as GPTQ has its working copy.
            weight = module.weight.detach().to(torch.float64)
            module.weight.data = module.weight.data.new_empty(0)
            result[name] = gptq_codes_from_inverse(weight, inverses[key], self.config, self.gptq, consume=True)
            del weight
            if last[key] == name:
                del inverses[key]
                for user in [n for n, e in stats.items() if e is entry]:
                    del stats[user]
            del entry
            streaming.return_freed_memory()  # the float32 weight and GPTQ's temporaries, from the heap
        return result


def quantize_checkpoint_layerwise(
    src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, algorithm: LayerAlgorithm | None = None,
    *, layer_method: LayerMethod | None = None, method: str, settings: dict[str, Any],
    calibration: CalibrationConfig | None = None, tokens: torch.Tensor | None = None,
    progress: streaming.ProgressFn | None = None, include_lm_head: bool = False,
    shard_bytes: int = streaming.DEFAULT_SHARD_BYTES, quantize: bool = True,
    input_activations: dict[str, Any] | None = None, config_entries: dict[str, Any] | None = None,
    reduce_stats: StatsReducer | None = None,
) -> dict[str, Any]:
    """The calibration engine the module describes, with a per-matrix ``algorithm`` or a ``layer_method``
    that sees the whole layer (exactly one). ``method`` names it in the output's quantization_config and
    ``settings`` (JSON) join the resume fingerprint. ``quantize`` false writes float weights (pruning);
    ``input_activations`` and ``config_entries`` go to the writer (:class:`nnopt.llm.streaming.UnitHooks`);
    ``reduce_stats`` combines each layer's statistics across processes before they are used."""
    if (algorithm is None) == (layer_method is None):
        raise ConfigError("quantize_checkpoint_layerwise takes an algorithm or a layer_method, exactly one")
    src, out = Path(src_dir), Path(out_dir)
    calibration = calibration or CalibrationConfig()
    calibration.validate()
    config.validate()
    chosen_method = layer_method if layer_method is not None else per_matrix(algorithm)  # type: ignore[arg-type]
    engine = _Engine(src, out, config, chosen_method, calibration, tokens, quantize=quantize,
                     reduce_stats=reduce_stats)
    hooks = streaming.UnitHooks(
        codes=engine.codes, commit=engine.commit, method=method, flush_each_unit=True, quantize=quantize,
        input_activations=input_activations, config_entries=dict(config_entries or {}),
        fingerprint={"settings": settings, "calibration": dataclasses.asdict(calibration),
                     "tokens_sha256": engine.tokens_digest, "tokens_shape": list(engine.tokens.shape)})
    result = streaming.write_quantized_checkpoint(src, out, config, progress, include_lm_head=include_lm_head,
                                                  shard_bytes=shard_bytes, hooks=hooks)
    result.update(method=method, calibration_windows=int(engine.tokens.shape[0]),
                  calibration_tokens=int(engine.tokens.numel()), calibrated_layers=engine.calibrated)
    return result


class _Engine:
    """Carries the calibration hidden states through the decoder layers as the writer asks for their codes."""

    def __init__(self, src: Path, out: Path, config: WeightQuantConfig, method: LayerMethod,
                 calibration: CalibrationConfig, tokens: torch.Tensor | None, *, quantize: bool = True,
                 reduce_stats: StatsReducer | None = None) -> None:
        self.src, self.partial = src, streaming.partial_dir(out)
        self.config, self.method, self.batch = config, method, calibration.batch
        self.quantize, self.reduce_stats = quantize, reduce_stats
        # a method that writes the Hessians' lower triangles itself (GPTQ's): not before, to save memory
        self.upper_only = bool(getattr(method, "upper_only", False)) and reduce_stats is None
        self.model_config = _model_config(src)
        self.layer_class, self.rotary_class = _layer_classes(self.model_config)
        self.tokens = _calibration_tokens(src, calibration, tokens, self.model_config)
        self.tokens_digest = hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()
        self.hidden: torch.Tensor | None = None
        self.next_layer = -1  # the layer whose inputs self.hidden holds
        self.calibrated = 0
        self._rotary: Any = None

    # ------------------------------------------------------------------------------ writer hooks

    def codes(self, unit: str, tensors: dict[str, torch.Tensor], chosen: set[str]) -> dict[str, Codes | torch.Tensor]:
        match = re.fullmatch(r"model\.layers\.(\d+)", unit)
        if match is None:
            return {}  # lm_head and other tensors outside the decoder layers: RTN
        index = int(match.group(1))
        hidden = self._inputs_of(index)
        dtypes = {name: t.dtype for name, t in tensors.items()}  # what the writer will store each one in
        layer = self._build_layer(index, tensors, chosen)
        prefix = f"{unit}."
        linears: dict[str, torch.nn.Linear] = {
            prefix + name + ".weight": module for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear) and prefix + name + ".weight" in chosen}
        missing = chosen - set(linears)
        if missing:
            raise UnsupportedModelError(f"{sorted(missing)[0]} is not a Linear weight of {unit} as transformers "
                                        f"builds it; layer-by-layer calibration quantizes Linear weights only")
        stats = self._statistics(layer, linears, hidden)

        def forward(states: torch.Tensor, layer: torch.nn.Module = layer) -> torch.Tensor:
            states = states.clone()
            self._forward(layer, states)
            return states

        context = LayerContext(unit, layer, linears, stats, self.config, hidden, forward)
        given = self.method(context)
        unknown = set(given) - set(linears)
        if unknown:
            raise ConfigError(f"the layer method returned codes for {sorted(unknown)[0]!r}, not a chosen weight")
        result: dict[str, Codes | torch.Tensor] = {}
        group = self.config.group_size
        for name, module in linears.items():
            if not self.quantize:
                if name in given:
                    raise ConfigError(f"the layer method returned codes for {name!r}, but this run writes float "
                                      "weights (quantize=False)")
                # as the writer stores it, so that the next layer calibrates on the weights written
                module.weight.data = module.weight.detach().to(dtypes[name]).float()
                result[name] = module.weight.detach()
                continue
            codes, step, zero = given[name] if name in given else streaming.rtn_codes(module.weight.detach(),
                                                                                    self.config)
            result[name] = (codes, step, zero)
            # a new tensor in place of the weight's (a method may have dropped it, as GPTQ does)
            module.weight.data = streaming.dequantize_rtn(codes, step, zero, group)
        del stats, given, context
        streaming.return_freed_memory()
        for key, value in layer.state_dict().items():  # what the method changed besides the chosen weights
            name = prefix + key
            if name not in linears and name in tensors and not torch.equal(value, tensors[name].float()):
                with torch.no_grad():  # rounded to the stored dtype in the layer too (a folded bf16 norm)
                    value.copy_(value.to(dtypes[name]).float())
                result[name] = value.detach().clone()
        self._forward(layer, hidden)  # in place: the quantized layer's outputs are the next layer's inputs
        streaming.return_freed_memory()
        self.next_layer = index + 1
        self.calibrated += 1
        del layer
        return result

    def commit(self, done_units: list[str]) -> list[str]:
        done_layers = sum(1 for unit in done_units if re.fullmatch(r"model\.layers\.\d+", unit))
        if self.hidden is None or self.next_layer != done_layers or done_layers == self._layer_count():
            return []
        name = CARRIED.format(done_layers)
        tmp = self.partial / (name + ".tmp")
        streaming.save_safetensors(tmp, {"hidden": self.hidden}, metadata={"layer": str(done_layers)})  # fsynced
        os.replace(tmp, self.partial / name)
        return [name]

    # ------------------------------------------------------------------------------ the work

    def _layer_count(self) -> int:
        return int(self.model_config.num_hidden_layers)

    def _inputs_of(self, index: int) -> torch.Tensor:
        if self.hidden is not None and self.next_layer == index:
            return self.hidden
        if index == 0:
            self.hidden = _embed(self.src, self.tokens, bool(getattr(self.model_config, "tie_word_embeddings",
                                                                        False)))
        else:  # a resumed run: the inputs the interrupted one saved after layer index - 1
            path = self.partial / CARRIED.format(index)
            if not path.is_file():
                raise ConfigError(f"cannot resume at layer {index}: {path} is missing; delete {self.partial} "
                                  "and start again")
            saved = [t for t in streaming._header_tensors(path, path.name) if t.name == "hidden"]
            if not saved:
                raise ConfigError(f"cannot resume at layer {index}: {path} holds no hidden states; delete "
                                  f"{self.partial} and start again")
            self.hidden = streaming._read_tensor(self.partial, saved[0])
        if self.hidden.shape[:2] != self.tokens.shape:
            raise ConfigError(f"carried hidden states {tuple(self.hidden.shape)} do not match the calibration "
                              f"tokens {tuple(self.tokens.shape)}")
        self.next_layer = index
        return self.hidden

    def _build_layer(self, index: int, tensors: dict[str, torch.Tensor], chosen: set[str]) -> torch.nn.Module:
        """Layer ``index`` in float32 from its source tensors. The chosen weights are taken out of ``tensors``
        (the writer's dict, the hook's to change: it reads the unit again) and become the layer's parameters
        as they are where already float32, without a copy; the others are copied, so that ``tensors`` keeps
        the source values to tell what a method changed."""
        prefix = f"model.layers.{index}."
        state: dict[str, torch.Tensor] = {}
        for name in [n for n in tensors if n.startswith(prefix)]:
            if name in chosen:
                state[name[len(prefix):]] = tensors.pop(name).float()
            else:
                value = tensors[name]
                state[name[len(prefix):]] = value.float() if value.dtype != torch.float32 else value.clone()
        with torch.device("meta"):
            layer: torch.nn.Module = self.layer_class(self.model_config, index)
        layer.to_empty(device="cpu")  # never written: replaced by the tensors below (assign)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise UnsupportedModelError(f"layer {index}'s tensors do not match transformers' "
                                        f"{self.layer_class.__name__}: {str(exc).splitlines()[0]}") from None
        layer.eval()
        return layer

    def _position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rotary is None:
            self._rotary = self.rotary_class(config=self.model_config)
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        cos, sin = self._rotary(hidden[:1], positions)
        return cos, sin

    def _layer_inputs(self, hidden: torch.Tensor) -> dict[str, Any]:
        """The decoder layer's keyword inputs for windows shaped like ``hidden``. No mask tensor: the layers
        run with SDPA attention (:func:`_model_config`), which is causal by ``is_causal`` when it gets none,
        with the same outputs as an additive causal mask (tested) and without the batch × heads × window²
        scores that a mask makes the CPU kernel materialize (26 MiB per 2 windows of 512 on a 1.1B layer)."""
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        return {"attention_mask": None, "position_ids": positions,
                "position_embeddings": self._position_embeddings(hidden)}

    def _forward(self, layer: torch.nn.Module, hidden: torch.Tensor) -> None:
        """Every calibration window through ``layer``, its outputs written over its inputs."""
        inputs = self._layer_inputs(hidden)
        with torch.no_grad():
            for b0 in range(0, hidden.shape[0], self.batch):
                out = layer(hidden[b0:b0 + self.batch], **inputs)
                hidden[b0:b0 + self.batch] = out[0] if isinstance(out, tuple) else out
                del out
                streaming.return_freed_memory()  # this batch's activations

    def _statistics(self, layer: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                    hidden: torch.Tensor) -> dict[str, InputStats]:
        """Each Linear's :class:`InputStats` over every calibration token, from one pass of the unquantized
        layer (its outputs thrown away); Linears fed the same tensor share one."""
        sums: dict[str, torch.Tensor] = {}
        absmax: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        shared: dict[str, str] = {}
        # The last input seen and the Linear it went to: Linears fed the same tensor (q/k/v, gate/up) come
        # one after another. A weak reference, so that the tensor is not kept alive (the attention's input
        # through the MLP, the down_proj's input to the end of the batch), and no other tensor passes for it
        # (an address alone would let post_attention_layernorm's output pass for input_layernorm's freed one).
        seen: list[tuple[weakref.ref[torch.Tensor], str]] = []

        def hook(name: str) -> Callable[..., None]:
            def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                x = inputs[0]
                owner = next((n for t, n in seen if t() is x), None)
                if owner is not None and owner != name:
                    shared[name] = owner
                    return
                if owner is None:
                    seen[:] = [(weakref.ref(x), name)]
                flat = x.detach().reshape(-1, x.shape[-1])
                peak = torch.maximum(flat.amax(dim=0), flat.amin(dim=0).neg()).float()  # max |x|, no |x| copy
                if name in sums:
                    torch.maximum(absmax[name], peak, out=absmax[name])
                else:
                    sums[name], absmax[name] = _zeros_upper(flat.shape[1]), peak
                _add_gram_upper(sums[name], flat)
                counts[name] = counts.get(name, 0) + flat.shape[0]
            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
        inputs = self._layer_inputs(hidden)
        try:
            with torch.no_grad():
                for b0 in range(0, hidden.shape[0], self.batch):
                    seen.clear()
                    layer(hidden[b0:b0 + self.batch], **inputs)
                    streaming.return_freed_memory()  # this batch's activations
        finally:
            for handle in handles:
                handle.remove()
        seen.clear()
        streaming.return_freed_memory()  # the passes' activations, before the lower triangles are written
        if not self.upper_only:
            for total in sums.values():
                _mirror_upper(total)
        stats = {name: InputStats(total, absmax[name], counts[name]) for name, total in sorted(sums.items())}
        if self.reduce_stats is not None:
            self.reduce_stats(stats)
        for entry in stats.values():
            if self.upper_only:
                _scale_upper(entry.hessian, 2.0 / entry.tokens)
            else:
                entry.hessian.mul_(2.0 / entry.tokens)
        for name, owner in shared.items():
            if name not in stats:
                stats[name] = stats[owner]
        return stats


# ------------------------------------------------------------------------------------------ helpers


def _zeros_upper(n: int) -> torch.Tensor:
    """An ``n × n`` float64 matrix for :func:`_add_gram_upper`, zero on and above the diagonal (in tiles) and
    not yet written below it: those pages are not resident until :func:`_mirror_upper` writes them, after
    the calibration passes, so the passes hold about half of each Hessian (121 of 242 MiB for 5632 inputs)."""
    total = torch.empty(n, n, dtype=torch.float64)
    for i0 in range(0, n, _TILE):
        total[i0:i0 + _TILE, i0:].zero_()
    return total


def _add_gram_upper(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += XᵀX`` (float64) on and above the diagonal only, a tile of columns at a time: half the
    work of the whole product, and no float64 copy of ``X`` nor ``in × in`` temporary (242 MiB for a
    5632-input down_proj). Each element is the same float64 sum over the tokens as in the whole product."""
    n = x.shape[1]
    for i0 in range(0, n, _TILE):
        a = x[:, i0:i0 + _TILE].double()
        a_t = a.t()
        for j0 in range(i0, n, _TILE):
            b = a if j0 == i0 else x[:, j0:j0 + _TILE].double()
            total[i0:i0 + _TILE, j0:j0 + _TILE] += a_t @ b


def _scale_upper(total: torch.Tensor, factor: float) -> None:
    """``total *= factor`` on and above the diagonal (the tiles :func:`_zeros_upper` wrote) only."""
    for i0 in range(0, total.shape[0], _TILE):
        total[i0:i0 + _TILE, i0:].mul_(factor)


def _mirror_upper(total: torch.Tensor) -> None:
    """The lower triangle of ``total`` from its upper one (what :func:`_add_gram_upper` left), in place."""
    n = total.shape[0]
    for i0 in range(0, n, _TILE):
        i1 = min(i0 + _TILE, n)
        tile = total[i0:i1, i0:i1]
        tile.copy_(tile.triu() + tile.triu(1).t())
        for j0 in range(i1, n, _TILE):
            total[j0:j0 + _TILE, i0:i1] = total[i0:i1, j0:j0 + _TILE].t()



def _model_config(src: Path) -> Any:
    config_json = streaming._read_json(src / "config.json")
    model_type = config_json.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"{src}: layer-by-layer calibration supports model types "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}; this is {model_type!r}")
    try:
        import transformers
    except ImportError:
        raise ConfigError("layer-by-layer calibration needs transformers: pip install 'nnopt[llm]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers' and huggingface_hub's own validation errors, of many types
        raise ConfigError(f"{src}/config.json: transformers refused it: {str(exc).splitlines()[0][:300]}") from None
    config._attn_implementation = "sdpa"
    return config


def _layer_classes(model_config: Any) -> tuple[type, type]:
    """transformers' decoder-layer and rotary-embedding classes for this config (e.g. LlamaDecoderLayer)."""
    model_type = model_config.model_type
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    stem = type(model_config).__name__.removesuffix("Config")
    layer, rotary = getattr(module, f"{stem}DecoderLayer", None), getattr(module, f"{stem}RotaryEmbedding", None)
    if layer is None or rotary is None:
        raise UnsupportedModelError(f"transformers has no {stem}DecoderLayer/{stem}RotaryEmbedding for "
                                    f"model type {model_type!r}")
    return layer, rotary


def _calibration_tokens(src: Path, calibration: CalibrationConfig, tokens: torch.Tensor | None,
                        model_config: Any) -> torch.Tensor:
    if tokens is None:
        from nnopt.llm import corpus
        from nnopt.llm.source import _tokenizer, _transformers

        if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise ConfigError(f"{src} has no tokenizer files: pass the calibration token ids (tokens=...)")
        tokenizer = _tokenizer(_transformers(), src, {})
        tokens = corpus.token_windows(tokenizer, corpus.calibration_text(), calibration.window, calibration.windows)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1 or tokens.dtype not in (torch.int64,
                                                                                              torch.int32):
        raise ConfigError(f"calibration tokens must be (windows, window) integer ids with window >= 2, got "
                          f"{tuple(tokens.shape)} {tokens.dtype}")
    vocab = int(model_config.vocab_size)
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ConfigError(f"calibration token ids must lie in [0, {vocab}), got [{int(tokens.min())}, "
                          f"{int(tokens.max())}]")
    return tokens.long().contiguous()


def _embed(src: Path, tokens: torch.Tensor, tied: bool) -> torch.Tensor:
    """The calibration windows' input embeddings (float32), read from the one tensor that holds them (with
    tied embeddings, ``lm_head.weight`` where a writer kept only that copy, as safetensors' save_model does):
    only the rows of the tokens that occur, not the table (262 MB in float32 for 32000 × 2048)."""
    entries = {t.name: t for t in streaming._read_source(src)}
    name = _EMBED if _EMBED in entries or not tied else "lm_head.weight"
    if name not in entries:
        raise UnsupportedModelError(f"{src} has no {_EMBED}")
    table = entries[name]
    if len(table.shape) != 2 or table.shape[0] <= int(tokens.max()):
        raise UnsupportedModelError(f"{src}: {name} is {table.shape}, with no row for token id {int(tokens.max())}")
    rows, where = torch.unique(tokens, sorted=True, return_inverse=True)
    return streaming.read_rows(src, table, rows)[where].float()
