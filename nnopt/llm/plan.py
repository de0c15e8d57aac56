"""LLM recipes: a causal LM checkpoint's compression as a plan of at most two streamed steps, loadable from YAML.

A plan prunes (``llm-prune``: :func:`nnopt.llm.pruning.prune_checkpoint`) and/or quantizes (``llm-quantize``:
RTN, GPTQ, AWQ or SmoothQuant W8A8), in that order, each step reading one decoder layer at a time::

    name: wanda-2of4-int8
    calibration: {windows: 32, window: 512, batch: 4}   # optional; text: a UTF-8 file (default: nnopt's)
    steps:
      - kind: llm-prune
        method: wanda
        pattern: "2:4"          # quoted: YAML 1.1 reads 2:4 as the base-60 number 124
      - kind: llm-quantize
        method: rtn
        bits: 8
        group_size: channel

Each step maps to the configs the Python API takes (:class:`~nnopt.llm.pruning.PruneConfig`,
:class:`~nnopt.quantization.weights.WeightQuantConfig`, :class:`~nnopt.llm.gptq.GPTQConfig`,
:class:`~nnopt.llm.awq.AWQConfig`, :class:`~nnopt.llm.smoothquant.SmoothQuantConfig`), validated by their own
``validate()``. Parsing rejects anything it does not know, naming the place and what is allowed. GPTQ after
pruning is refused: its error-compensating updates change the weights not yet quantized, pruned zeros
included (measured: a 50% pruned matrix with correlated inputs kept 95% of its zeros through GPTQ int4, all of
them through RTN). RTN, AWQ and SmoothQuant keep every zero: they scale whole input columns (``0 · s = 0``) and
round 0 to the zero point, which dequantizes to exactly 0.

:func:`run_plan` runs the steps into a temporary directory beside the output (the intermediate pruned
checkpoint included), records the plan as ``nnopt_plan.yaml`` and renames the result into place, so a failed
run leaves neither a half-written output nor the intermediate.

>>> plan = parse_plan({"steps": [{"kind": "llm-quantize", "method": "awq", "bits": 4, "group_size": 128}]})
>>> plan.quantize.method, plan.quantize.weights.group_size
('awq', 128)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnopt.errors import ConfigError
from nnopt.io.yaml_file import read_yaml_file
from nnopt.llm.awq import AWQConfig
from nnopt.llm.gptq import GPTQConfig
from nnopt.llm.layerwise import CalibrationConfig
from nnopt.llm.pruning import METHODS as PRUNE_METHODS
from nnopt.llm.pruning import PruneConfig
from nnopt.llm.smoothquant import SmoothQuantConfig
from nnopt.quantization.weights import WeightQuantConfig

__all__ = [
    "PLAN_FILE", "LLMCalibration", "LLMPlan", "PruneStep", "QuantizeStep", "describe_plan", "load_plan",
    "parse_plan", "plan_to_dict", "plan_to_yaml", "run_plan", "safetensors_bytes",
]

PLAN_FILE = "nnopt_plan.yaml"  # the plan, recorded in the output directory
PRUNE_KIND, QUANTIZE_KIND = "llm-prune", "llm-quantize"
KINDS = (PRUNE_KIND, QUANTIZE_KIND)
TOP_LEVEL_KEYS = ("name", "description", "calibration", "steps")
CALIBRATION_KEYS = ("windows", "window", "batch", "text")
QUANTIZE_METHODS = ("rtn", "gptq", "awq", "smoothquant")
PRUNE_KEYS = ("kind", "method", "sparsity", "pattern", "damp", "block")
QUANTIZE_KEYS = ("kind", "method", "bits", "group_size", "symmetric", "include_lm_head")
# each quantize method's own settings: the fields of its config class
METHOD_SETTINGS: dict[str, type | None] = {"rtn": None, "gptq": GPTQConfig, "awq": AWQConfig,
                                           "smoothquant": SmoothQuantConfig}
KEEPS_ZEROS = ("rtn", "awq", "smoothquant")  # quantize methods that keep a pruned weight exactly 0

# a step's title ("pruning", "quantizing") -> that step's per-layer callback (done, total, unit); see run_plan
StepProgress = Callable[[str], Callable[[int, int, str], None]]


# ------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class LLMCalibration:
    """The calibration windows the calibrated steps read: ``windows`` windows of ``window`` tokens, ``batch``
    at a time, of ``text`` (a UTF-8 file; None: nnopt's bundled calibration text)."""

    windows: int = CalibrationConfig.windows
    window: int = CalibrationConfig.window
    batch: int = CalibrationConfig.batch
    text: str | None = None

    def config(self) -> CalibrationConfig:
        return CalibrationConfig(windows=self.windows, window=self.window, batch=self.batch)


@dataclasses.dataclass(frozen=True)
class PruneStep:
    """``llm-prune``: zeros by :func:`nnopt.llm.pruning.prune_checkpoint` with ``config``."""

    config: PruneConfig


@dataclasses.dataclass(frozen=True)
class QuantizeStep:
    """``llm-quantize``: ``method`` (rtn, gptq, awq, smoothquant) with ``weights`` and the method's own
    ``settings`` (GPTQConfig, AWQConfig, SmoothQuantConfig; None for rtn)."""

    method: str
    weights: WeightQuantConfig
    include_lm_head: bool = False
    settings: Any = None


@dataclasses.dataclass(frozen=True)
class LLMPlan:
    """At most one prune step, then at most one quantize step (at least one of them)."""

    prune: PruneStep | None = None
    quantize: QuantizeStep | None = None
    name: str = ""
    description: str = ""
    calibration: LLMCalibration = LLMCalibration()

    @property
    def steps(self) -> tuple[PruneStep | QuantizeStep, ...]:
        return tuple(s for s in (self.prune, self.quantize) if s is not None)

    def validate(self) -> None:
        """What :func:`parse_plan` checks, for a plan built in Python: at least one step, each step's configs,
        and no method that fills pruned zeros after a prune step."""
        if not self.steps:
            raise ConfigError("the plan has no step")
        if self.prune is not None:
            self.prune.config.validate()
        if self.quantize is not None:
            if self.quantize.method not in QUANTIZE_METHODS:
                raise ConfigError(f"quantize method must be one of {', '.join(QUANTIZE_METHODS)}, got "
                                  f"{self.quantize.method!r}")
            self.quantize.weights.validate()
            if self.prune is not None and self.quantize.method not in KEEPS_ZEROS:
                raise ConfigError(_fills_zeros(self.quantize.method))

    @property
    def calibrated(self) -> bool:
        """Whether a step reads the calibration text."""
        return (self.prune is not None and self.prune.config.method != "magnitude") or (
            self.quantize is not None and self.quantize.method != "rtn")


# ------------------------------------------------------------------------------------------ parsing


def _fills_zeros(method: str) -> str:
    return (f"method {method} after {PRUNE_KIND} would fill the pruned zeros (GPTQ's error-compensating updates "
            f"change the weights not yet quantized, zeros included); after pruning use {', '.join(KEEPS_ZEROS)}")


def parse_plan(data: Any, where: str = "plan") -> LLMPlan:
    """An :class:`LLMPlan` from plain data (what ``yaml.safe_load`` returns); every error names its place,
    e.g. ``R.yaml: steps[1] (kind llm-quantize): unknown key 'bitz'; allowed: ...``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'steps' list, got {_describe(data)}")
    _reject_unknown(data, TOP_LEVEL_KEYS, where)
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{where}: {key}: expected a string, got {_describe(data[key])}")
    calibration = _parse_calibration(data.get("calibration"), f"{where}: calibration")
    if "steps" not in data:
        raise ConfigError(f"{where}: missing key 'steps' (a list of mappings, each with a 'kind': "
                          f"{', '.join(KINDS)})")
    steps = data["steps"]
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}: steps: expected a non-empty list of mappings, got {_describe(steps)}")
    prune: PruneStep | None = None
    quantize: QuantizeStep | None = None
    for index, item in enumerate(steps):
        place = f"{where}: steps[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{place}: expected a mapping with a 'kind', got {_describe(item)}")
        kind = item.get("kind")
        if kind not in KINDS:
            what = "missing key 'kind'" if kind is None else f"unknown kind {kind!r}"
            raise ConfigError(f"{place}: {what}; known kinds: {', '.join(KINDS)}")
        place = f"{place} (kind {kind})"
        if kind == PRUNE_KIND:
            if prune is not None or quantize is not None:
                raise ConfigError(f"{place}: a plan prunes at most once, before it quantizes (at most one "
                                  f"{PRUNE_KIND} step, then at most one {QUANTIZE_KIND} step)")
            prune = _parse_prune(item, place)
        else:
            if quantize is not None:
                raise ConfigError(f"{place}: a plan quantizes at most once (at most one {PRUNE_KIND} step, then "
                                  f"at most one {QUANTIZE_KIND} step)")
            quantize = _parse_quantize(item, place)
            if prune is not None and quantize.method not in KEEPS_ZEROS:
                raise ConfigError(f"{place}: {_fills_zeros(quantize.method)}")
    return LLMPlan(prune=prune, quantize=quantize, name=data.get("name", ""),
                   description=data.get("description", ""), calibration=calibration)


def load_plan(path: str | Path) -> LLMPlan:
    """Read a YAML plan file (``yaml.safe_load``: nothing in it is executed)."""
    data = read_yaml_file(path)
    return parse_plan(data, where=str(path))


def _parse_calibration(data: Any, place: str) -> LLMCalibration:
    if data is None:
        return LLMCalibration()
    if not isinstance(data, dict):
        raise ConfigError(f"{place}: expected a mapping ({', '.join(CALIBRATION_KEYS)}), got {_describe(data)}")
    _reject_unknown(data, CALIBRATION_KEYS, place)
    for key in ("windows", "window", "batch"):
        if key in data:
            _check_type(data[key], int, f"{place}: {key}")
    if "text" in data and (not isinstance(data["text"], str) or not data["text"]):
        raise ConfigError(f"{place}: text: expected the path of a UTF-8 text file, got {_describe(data['text'])}")
    calibration = LLMCalibration(**data)
    try:
        calibration.config().validate()
    except ConfigError as exc:
        raise ConfigError(f"{place}: {exc}") from None
    return calibration


def _parse_prune(item: dict[str, Any], place: str) -> PruneStep:
    _reject_unknown(item, PRUNE_KEYS, place)
    method = item.get("method", "wanda")
    if method not in PRUNE_METHODS:
        raise ConfigError(f"{place}: method: must be one of {', '.join(PRUNE_METHODS)}, got {_describe(method)}")
    if "sparsity" in item and "pattern" in item:
        raise ConfigError(f"{place}: give sparsity (unstructured) or pattern (N:M), not both")
    hints = typing.get_type_hints(PruneConfig)
    for key in ("sparsity", "damp", "block"):
        if key in item:
            _check_type(item[key], hints[key], f"{place}: {key}")
    config = PruneConfig(method=method, sparsity=item.get("sparsity"),
                         n_m=_parse_pattern(item["pattern"], f"{place}: pattern") if "pattern" in item else None,
                         damp=item.get("damp", PruneConfig.damp), block=item.get("block", PruneConfig.block))
    try:
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{place}: {exc}") from None
    return PruneStep(config)


def _parse_pattern(value: Any, place: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(f"{place}: expected a quoted string \"N:M\" such as \"2:4\", got the number {value} "
                          "(YAML 1.1 reads an unquoted 2:4 as the base-60 number 124: write pattern: \"2:4\")")
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{place}: expected \"N:M\" such as \"2:4\", got {_describe(value)}")
    return int(parts[0]), int(parts[1])


def _parse_quantize(item: dict[str, Any], place: str) -> QuantizeStep:
    method = item.get("method", "rtn")
    if method not in QUANTIZE_METHODS:
        raise ConfigError(f"{place}: method: must be one of {', '.join(QUANTIZE_METHODS)}, got {_describe(method)}")
    settings_type = METHOD_SETTINGS[method]
    own = [f.name for f in dataclasses.fields(settings_type)] if settings_type is not None else []
    allowed = (*QUANTIZE_KEYS, *own)
    unknown = sorted((k for k in item if k not in allowed), key=str)
    if unknown:
        others = {m: t for m, t in METHOD_SETTINGS.items() if t is not None and m != method}
        owner = next((m for m, t in others.items() for k in unknown
                      if k in [f.name for f in dataclasses.fields(t)]), None)
        hint = f" ({unknown[0]!r} is a setting of method {owner})" if owner else ""
        noun = "key" if len(unknown) == 1 else "keys"
        raise ConfigError(f"{place}: unknown {noun} {', '.join(map(repr, unknown))} for method {method}{hint}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    for key, kind in (("bits", int), ("symmetric", bool), ("include_lm_head", bool)):
        if key in item:
            _check_type(item[key], kind, f"{place}: {key}")
    default_bits, default_group = (8, "channel") if method == "smoothquant" else (4, 128)
    bits = item.get("bits", default_bits)
    group = item.get("group_size", default_group)
    if group != "channel" and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ConfigError(f"{place}: group_size: expected a positive integer (inputs per scale) or 'channel' (one "
                          f"scale per output row), got {_describe(group)}")
    weights = WeightQuantConfig(bits=bits, symmetric=item.get("symmetric", True), per_channel=group == "channel",
                                group_size=None if group == "channel" else group)
    include_lm_head = item.get("include_lm_head", False)
    settings: Any = None
    try:
        weights.validate()
        if method == "smoothquant":
            if (bits, group, weights.symmetric) != (8, "channel", True):
                raise ConfigError("SmoothQuant is W8A8: bits 8, group_size channel, symmetric true (the "
                                  f"defaults), got bits {bits}, group_size {group}, symmetric {weights.symmetric}")
            if include_lm_head:
                raise ConfigError("SmoothQuant keeps lm_head in float; include_lm_head does not apply")
        if settings_type is not None:
            hints = typing.get_type_hints(settings_type)
            for key in own:
                if key in item:
                    _check_type(item[key], hints[key], f"{key}")
            settings = settings_type(**{k: item[k] for k in own if k in item})
            if method == "smoothquant":
                settings.validate()
            else:
                settings.validate(weights)
    except ConfigError as exc:
        raise ConfigError(f"{place}: {exc}") from None
    return QuantizeStep(method=method, weights=weights, include_lm_head=include_lm_head, settings=settings)


def _check_type(value: Any, hint: Any, place: str) -> None:
    """int: an integer (not a bool); float: any number; bool: true or false. ``X | None`` as X."""
    options = typing.get_args(hint) or (hint,)
    if bool in options:
        ok, expected = isinstance(value, bool), "true or false"
    elif float in options:
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    if not ok:
        extra = ""
        if isinstance(value, str) and float in options:
            try:
                float(value)
                extra = " (YAML reads exponents without a dot as text: write 1.0e-3, not 1e-3)"
            except ValueError:
                pass
        raise ConfigError(f"{place}: expected {expected}, got {_describe(value)}{extra}")


def _reject_unknown(data: dict[Any, Any], allowed: tuple[str, ...], place: str) -> None:
    unknown = sorted((key for key in data if key not in allowed), key=str)
    if unknown:
        noun = "key" if len(unknown) == 1 else "keys"
        raise ConfigError(f"{place}: unknown {noun} {', '.join(map(repr, unknown))}; allowed: "
                          f"{', '.join(sorted(allowed))}")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


# ------------------------------------------------------------------------------------------ writing


def plan_to_dict(plan: LLMPlan) -> dict[str, Any]:
    """Plain data that :func:`parse_plan` reads back to an equal plan (every setting written out)."""
    data: dict[str, Any] = {}
    if plan.name:
        data["name"] = plan.name
    if plan.description:
        data["description"] = plan.description
    if plan.calibrated or plan.calibration != LLMCalibration():  # an RTN or magnitude plan reads no text
        calibration = dataclasses.asdict(plan.calibration)
        if calibration["text"] is None:
            del calibration["text"]
        data["calibration"] = calibration
    steps: list[dict[str, Any]] = []
    if plan.prune is not None:
        config = plan.prune.config
        step: dict[str, Any] = {"kind": PRUNE_KIND, "method": config.method}
        if config.n_m is not None:
            step["pattern"] = config.pattern
        elif config.sparsity is not None:
            step["sparsity"] = float(config.sparsity)
        step.update(damp=config.damp, block=config.block)
        steps.append(step)
    if plan.quantize is not None:
        q = plan.quantize
        step = {"kind": QUANTIZE_KIND, "method": q.method, "bits": q.weights.bits,
                "group_size": "channel" if q.weights.group_size is None else q.weights.group_size,
                "symmetric": q.weights.symmetric, "include_lm_head": q.include_lm_head}
        if q.settings is not None:
            step.update(dataclasses.asdict(q.settings))
        steps.append(step)
    data["steps"] = steps
    return data


def plan_to_yaml(plan: LLMPlan) -> str:
    """The plan as YAML that :func:`load_plan` reads back (``nnopt llm run`` runs it)."""
    import yaml

    return yaml.safe_dump(plan_to_dict(plan), sort_keys=False, default_flow_style=False)


def describe_plan(plan: LLMPlan) -> str:
    """One line: ``wanda 2:4 + rtn int8 per channel``."""
    parts = []
    if plan.prune is not None:
        config = plan.prune.config
        shape = config.pattern if config.n_m is not None else f"{config.target_sparsity:g} unstructured"
        parts.append(f"{config.method} {shape}")
    if plan.quantize is not None:
        w = plan.quantize.weights
        scheme = "per channel" if w.group_size is None else f"groups of {w.group_size}"
        parts.append(f"{plan.quantize.method} int{w.bits} {scheme}{'' if w.symmetric else ' asymmetric'}")
    return " + ".join(parts)


# ------------------------------------------------------------------------------------------ running


def safetensors_bytes(directory: Path) -> int:
    """Bytes of the ``*.safetensors`` files in ``directory`` (a checkpoint's weights, measured on disk)."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def run_plan(plan: LLMPlan, src_dir: str | Path, out_dir: str | Path,
             progress: StepProgress | None = None) -> dict[str, Any]:
    """Run ``plan`` on the Hugging Face checkpoint ``src_dir``, writing ``out_dir`` (which must not exist).

    Each step streams one decoder layer at a time into a temporary directory beside ``out_dir``; the last
    step's output, with the plan recorded as ``nnopt_plan.yaml``, is renamed to ``out_dir`` at the end, and
    the temporary directory (the intermediate pruned checkpoint included) is removed, also when a step fails.
    ``progress(title)`` gives each step its per-layer callback ``(done, total, unit)`` (title ``pruning`` or
    ``quantizing``). Returns each step's figures (seconds, peak RSS, bytes written, sparsity measured in the
    written weights, ...) under ``steps``, plus the totals: ``seconds``, ``peak_rss_bytes``, ``output_bytes``
    (safetensors bytes in ``out_dir``), ``source_bytes`` and, after pruning, ``sparsity``."""
    from nnopt.io.atomic import atomic_directory, check_replaceable, refuse_input_overlap
    from nnopt.llm.methods import world_size
    from nnopt.llm.streaming import peak_rss_bytes

    src, out = Path(src_dir), Path(out_dir)
    plan.validate()
    if world_size() > 1:
        raise ConfigError(f"nnopt llm run runs in one process; under torchrun (WORLD_SIZE={world_size()}) use "
                          "nnopt llm quantize --method gptq|awq|smoothquant")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    refuse_input_overlap(out, [src])
    check_replaceable(out, None)  # refused before any work: the output must not exist
    tokens, text_digest = _calibration_tokens(plan, src)
    start = time.perf_counter()
    figures: list[dict[str, Any]] = []
    with atomic_directory(out, manifest=False) as work:
        current = src
        for index, step in enumerate(plan.steps):
            target = work / f"step-{index + 1}"
            if isinstance(step, PruneStep):
                result = _prune(step, current, target, plan, tokens, progress)
            else:
                result = _quantize(step, current, target, plan, tokens, progress)
            result = {"kind": PRUNE_KIND if isinstance(step, PruneStep) else QUANTIZE_KIND, **result,
                      "method": step.config.method if isinstance(step, PruneStep) else step.method}
            figures.append(result)
            if current != src:
                shutil.rmtree(current)  # the intermediate, as soon as the next step has read it
            current = target
        for item in list(current.iterdir()):  # the last step's files become the output
            os.rename(item, work / item.name)
        current.rmdir()
        (work / PLAN_FILE).write_text(plan_to_yaml(plan), encoding="utf-8")
    output_bytes = safetensors_bytes(out)
    summary: dict[str, Any] = {
        "plan": plan_to_dict(plan), "description": describe_plan(plan), "steps": figures,
        "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
        "source_bytes": figures[0].get("source_bytes"), "output_bytes": output_bytes,
        "format": figures[-1].get("format"),
    }
    if plan.prune is not None:
        summary["sparsity"] = figures[0]["sparsity"]
    if text_digest is not None:
        summary["calibration_text_sha256"] = text_digest
    return summary


def _calibration_tokens(plan: LLMPlan, src: Path) -> tuple[Any, str | None]:
    """The calibration windows cut from the plan's own text (None: each step cuts the bundled text itself)."""
    if plan.calibration.text is None or not plan.calibrated:
        return None, None
    from nnopt.llm import corpus
    from nnopt.llm.source import _tokenizer, _transformers

    path = Path(plan.calibration.text)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"calibration text {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"calibration text {path}: not UTF-8 text") from None
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{src} has no tokenizer files: the calibration text cannot be tokenized")
    tokenizer = _tokenizer(_transformers(), src, {})
    c = plan.calibration
    try:
        tokens = corpus.token_windows(tokenizer, text, c.window, c.windows)
    except ConfigError as exc:
        raise ConfigError(f"calibration text {path}: {exc}") from None
    return tokens, hashlib.sha256(raw).hexdigest()


def _step_progress(progress: StepProgress | None, title: str) -> Any:
    return progress(title) if progress is not None else None


def _prune(step: PruneStep, src: Path, out: Path, plan: LLMPlan, tokens: Any,
           progress: StepProgress | None) -> dict[str, Any]:
    from nnopt.llm.pruning import prune_checkpoint

    calibrated = step.config.method != "magnitude"
    return prune_checkpoint(src, out, step.config, calibration=plan.calibration.config() if calibrated else None,
                            tokens=tokens if calibrated else None, progress=_step_progress(progress, "pruning"))


def _rtn(step: QuantizeStep, src: Path, out: Path, common: dict[str, Any]) -> dict[str, Any]:
    from nnopt.llm.streaming import quantize_checkpoint_rtn

    return quantize_checkpoint_rtn(src, out, step.weights, common["progress"], include_lm_head=step.include_lm_head)


def _gptq(step: QuantizeStep, src: Path, out: Path, common: dict[str, Any]) -> dict[str, Any]:
    from nnopt.llm.layerwise import quantize_checkpoint_gptq

    return quantize_checkpoint_gptq(src, out, step.weights, gptq=step.settings, include_lm_head=step.include_lm_head,
                                    **common)


def _awq(step: QuantizeStep, src: Path, out: Path, common: dict[str, Any]) -> dict[str, Any]:
    from nnopt.llm.awq import quantize_checkpoint_awq

    return quantize_checkpoint_awq(src, out, step.weights, awq=step.settings, include_lm_head=step.include_lm_head,
                                   **common)


def _smoothquant(step: QuantizeStep, src: Path, out: Path, common: dict[str, Any]) -> dict[str, Any]:
    from nnopt.llm.smoothquant import quantize_checkpoint_smoothquant

    return quantize_checkpoint_smoothquant(src, out, smooth=step.settings, **common)


# how each quantize method runs (one process; the calibrated ones read ``tokens`` or cut ``calibration``)
QUANTIZERS: dict[str, Callable[[QuantizeStep, Path, Path, dict[str, Any]], dict[str, Any]]] = {
    "rtn": _rtn, "gptq": _gptq, "awq": _awq, "smoothquant": _smoothquant}


def _quantize(step: QuantizeStep, src: Path, out: Path, plan: LLMPlan, tokens: Any,
              progress: StepProgress | None) -> dict[str, Any]:
    common = {"calibration": plan.calibration.config(), "tokens": tokens,
              "progress": _step_progress(progress, "quantizing")}
    return QUANTIZERS[step.method](step, src, out, common)
