"""`nnopt llm auto`: the smallest LLM plan whose perplexity stays within a budget, measured.

The source checkpoint's perplexity is measured once on held-out text (nnopt's evaluation text, never the
calibration text, or the user's file). Then each candidate plan (:mod:`nnopt.llm.plan`) is run, streaming,
in the order of its expected size (bits per weight from its bits and group size: the sizes are known before
any run), and the written checkpoint's perplexity and next-token KL from the source are measured on the same
windows, with the bytes of the safetensors it wrote. The first candidate within the budget is the smallest
one (every later one is expected at least as big), so the search stops there; the budget is a relative
perplexity increase, ``ppl / ppl_source − 1 ≤ max_increase``.

OUT gets ``model/`` (the chosen checkpoint, moved, not run again), ``recipe.yaml`` (its plan, runnable with
``nnopt llm run``), ``report.json`` and ``report.md`` (every candidate tried). When none meets the budget OUT
holds the reports only and :attr:`AutoResult.exit_code` is 3.

>>> parse_candidate("awq-int4-g128").quantize.weights.group_size
128
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnopt.errors import ConfigError, NnoptError

if TYPE_CHECKING:  # the plan module imports torch: `nnopt --help` reads this module's names without it
    from nnopt.llm.plan import LLMCalibration, LLMPlan, StepProgress

__all__ = ["DEFAULT_CANDIDATES", "AutoResult", "CandidateResult", "auto_quantize", "expected_bits",
           "parse_candidate", "select"]

# smallest first: int4 with a float32 scale per 128 inputs (4.25 bits per weight), per 64 (4.5), int8 (8)
DEFAULT_CANDIDATES = ("awq-int4-g128", "gptq-int4-g128", "awq-int4-g64", "gptq-int4-g64", "rtn-int8-channel")
OBJECTIVES = ("size",)
_NAME = re.compile(r"^(?P<method>rtn|gptq|awq)-int(?P<bits>[2-8])-(?:g(?P<group>[1-9][0-9]*)|(?P<channel>channel))"
                   r"(?P<asym>-asym)?$")
CANDIDATE_HELP = ("METHOD-intB-gN (groups of N inputs) or METHOD-intB-channel, METHOD rtn, gptq or awq, B 2..8, "
                  "optionally -asym (a zero point); smoothquant-w8a8; or a recipe .yaml file")


@dataclasses.dataclass(frozen=True)
class CandidateResult:
    """One candidate as measured: perplexity on the evaluation windows, its relative ``increase`` over the
    source's, the mean next-token KL from the source, the safetensors bytes written, the seconds the plan took
    and the evaluation took; ``error`` when the plan could not run (e.g. a group larger than a layer)."""

    name: str
    description: str
    recipe: dict[str, Any]
    expected_bits: float
    perplexity: float | None = None
    increase: float | None = None
    kl_mean: float | None = None
    output_bytes: int | None = None
    seconds: float | None = None
    eval_seconds: float | None = None
    meets_budget: bool = False
    chosen: bool = False
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class AutoResult:
    """What :func:`auto_quantize` measured and chose (``chosen``: a candidate's name, or None)."""

    out: Path
    chosen: str | None
    source_perplexity: float
    source_bytes: int
    max_increase: float
    candidates: tuple[CandidateResult, ...]
    not_tried: tuple[str, ...]
    method: str
    peak_rss_bytes: int
    seconds: float
    # the chosen plan and the source on the windows after the selection windows, which the search never
    # read: {"windows", "source_perplexity", "perplexity", "increase", "kl_mean"} (None: none chosen, or the
    # text too short for them)
    held_out: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        """0 with a chosen plan, 3 when no candidate meets the budget (as ``nnopt auto``)."""
        return 0 if self.chosen is not None else 3

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["objective"] = "size: measured bytes of the safetensors files written"
        return data


# ------------------------------------------------------------------------------------------ candidates


def parse_candidate(name: str, calibration: LLMCalibration | None = None) -> LLMPlan:
    """The plan a candidate name stands for (see ``CANDIDATE_HELP``); a ``.yaml``/``.yml`` path is read as a
    plan file (its own calibration kept)."""
    from nnopt.llm.plan import LLMCalibration, load_plan, parse_plan

    text = name.strip()
    if text.endswith((".yaml", ".yml")):
        return load_plan(text)
    calibration = calibration or LLMCalibration()
    if text == "smoothquant-w8a8":
        step: dict[str, Any] = {"kind": "llm-quantize", "method": "smoothquant"}
    else:
        match = _NAME.match(text)
        if match is None:
            raise ConfigError(f"candidate {name!r}: expected {CANDIDATE_HELP}")
        step = {"kind": "llm-quantize", "method": match["method"], "bits": int(match["bits"]),
                "group_size": "channel" if match["channel"] else int(match["group"]),
                "symmetric": match["asym"] is None}
    return parse_plan({"name": text, "calibration": _calibration_dict(calibration), "steps": [step]},
                      where=f"candidate {text}")


def _calibration_dict(calibration: LLMCalibration) -> dict[str, Any]:
    data = dataclasses.asdict(calibration)
    return {k: v for k, v in data.items() if v is not None}


def expected_bits(plan: LLMPlan) -> float:
    """Bits per quantized weight the plan is expected to write: the code bits, plus a float32 scale (and a
    zero point, packed at the code's own bits) per group; 32 for a plan that does not quantize (pruned weights
    are written dense)."""
    if plan.quantize is None:
        return 32.0
    w = plan.quantize.weights
    if w.group_size is None:
        return float(w.bits)
    return w.bits + (32 if w.symmetric else 32 + w.bits) / w.group_size


def select(results: Sequence[CandidateResult]) -> int | None:
    """The index of the smallest candidate (measured bytes) within the budget, the first one on a tie; None
    when none meets it."""
    within = [i for i, r in enumerate(results) if r.meets_budget and r.output_bytes is not None]
    if not within:
        return None
    return min(within, key=lambda i: (results[i].output_bytes, i))


# ------------------------------------------------------------------------------------------ the search


def auto_quantize(
    src: str | Path, out: str | Path, *, max_increase: float, objective: str = "size",
    candidates: Sequence[str] | None = None, text: str | Path | None = None, eval_windows: int = 8,
    window: int = 512, calibration: LLMCalibration | None = None, log: Callable[[str], None] | None = None,
    progress: StepProgress | None = None,
) -> AutoResult:
    """Find the smallest candidate plan whose perplexity on held-out text is at most ``(1 + max_increase)``
    times the source's, and write OUT (``out`` must not exist) as the module says.

    ``candidates``: names (``awq-int4-g128``, ``rtn-int8-channel``, ..., or plan files; default
    :data:`DEFAULT_CANDIDATES`), tried smallest expected size first. ``text``: a UTF-8 file to evaluate on
    (default nnopt's evaluation text), cut into ``eval_windows`` windows of ``window`` tokens. ``calibration``
    for the calibrated methods (default 32 windows of 512 tokens of the calibration text). ``log`` receives a
    line per candidate; ``progress`` per-layer callbacks (see :func:`nnopt.llm.plan.run_plan`).
    """
    import torch

    from nnopt.io.atomic import atomic_directory, check_replaceable, refuse_input_overlap
    from nnopt.llm import corpus, quality
    from nnopt.llm.plan import describe_plan, plan_to_yaml, safetensors_bytes
    from nnopt.llm.source import load_causal_lm
    from nnopt.llm.streaming import peak_rss_bytes

    say = log or (lambda line: None)
    src, out = Path(src), Path(out)
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)} (the only one for now), got "
                          f"{objective!r}")
    if isinstance(max_increase, bool) or not isinstance(max_increase, (int, float)) or not (
            max_increase >= 0 and math.isfinite(max_increase)):
        raise ConfigError(f"max_increase: a perplexity increase >= 0 (0.02 = 2%), got {max_increase!r}")
    for value, label in ((eval_windows, "eval_windows"), (window, "window")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label}: must be a positive integer, got {value!r}")
    names = list(DEFAULT_CANDIDATES if candidates is None else candidates)
    if not names:
        raise ConfigError("no candidates: give at least one")
    if len(set(names)) != len(names):
        raise ConfigError(f"candidates: {sorted({n for n in names if names.count(n) > 1})[0]!r} is given twice")
    plans = {name: parse_candidate(name, calibration) for name in names}
    # smallest expected size first; Python's sort is stable, so the given order breaks ties
    order = sorted(names, key=lambda n: expected_bits(plans[n]))
    refuse_input_overlap(out, [src])
    check_replaceable(out, None)
    eval_text, text_name = _evaluation_text(text)
    start = time.perf_counter()

    source = load_causal_lm(src, dtype=torch.float32)
    if source.tokenizer is None:
        raise ConfigError(f"{src}: no tokenizer files: the evaluation text cannot be tokenized")
    if source.max_positions is not None and window > source.max_positions:
        raise ConfigError(f"window {window} is longer than the model's {source.max_positions} positions")
    ids = corpus.tokenize(source.tokenizer, eval_text)
    baseline = quality.evaluate(source.model, ids, window=window, max_windows=eval_windows)
    method = (f"measured: perplexity on {baseline.windows} windows of {baseline.window} tokens of {text_name} "
              "(the selection windows; the chosen plan also on the windows after them, in held_out), "
              "KL(P_source || P_candidate) over the same positions: "
              f"{baseline.method.removeprefix('measured: ')}")
    say(f"source     perplexity {baseline.perplexity:.4f} on {baseline.windows} windows of {baseline.window} "
        f"tokens ({baseline.seconds:.1f} s); budget: at most {baseline.perplexity * (1 + max_increase):.4f} "
        f"(+{max_increase:.2%})")
    source_bytes = safetensors_bytes(src)

    results: list[CandidateResult] = []
    chosen_index: int | None = None
    with atomic_directory(out, manifest=False) as work:
        trials = work / "candidates"
        trials.mkdir()
        for k, name in enumerate(order):
            plan = plans[name]
            say(f"[{k + 1}/{len(order)}] {name}: {describe_plan(plan)} ...")
            result = _try(name, plan, src, trials / f"{k + 1}", source.model, ids, window, eval_windows,
                          baseline.perplexity, max_increase, progress)
            results.append(result)
            say(_line(result))
            if not result.meets_budget and (trials / f"{k + 1}").exists():
                shutil.rmtree(trials / f"{k + 1}")  # not chosen: free its disk now
            if result.meets_budget:  # every later candidate is expected at least as big
                break
        if all(r.error is not None for r in results):
            raise ConfigError(f"no candidate could run on {src}: {results[0].name}: {results[0].error}")
        chosen_index = select(results)
        held_out = None
        if chosen_index is not None:
            results[chosen_index] = dataclasses.replace(results[chosen_index], chosen=True)
            (trials / f"{chosen_index + 1}").rename(work / "model")
            held_out = _held_out(work / "model", source.model, ids[baseline.windows * baseline.window:], window,
                                 eval_windows)
            if held_out is not None:
                say(f"held out   the chosen plan on {held_out['windows']} later windows, never used to choose: "
                    f"perplexity {held_out['perplexity']:.4f} ({held_out['increase']:+.2%} over the source's "
                    f"{held_out['source_perplexity']:.4f})")
            (work / "recipe.yaml").write_text(plan_to_yaml(plans[order[chosen_index]]), encoding="utf-8")
        shutil.rmtree(trials)
        chosen = order[chosen_index] if chosen_index is not None else None
        result_all = AutoResult(
            out=out, chosen=chosen, source_perplexity=baseline.perplexity, source_bytes=source_bytes,
            max_increase=float(max_increase), candidates=tuple(results), not_tried=tuple(order[len(results):]),
            method=method, peak_rss_bytes=peak_rss_bytes(), seconds=time.perf_counter() - start,
            held_out=held_out)
        (work / "report.json").write_text(json.dumps(result_all.to_dict(), indent=2) + "\n", encoding="utf-8")
        (work / "report.md").write_text(report_markdown(result_all), encoding="utf-8")
    return result_all


def _evaluation_text(text: str | Path | None) -> tuple[str, str]:
    from nnopt.llm import corpus

    if text is None:
        return corpus.evaluation_text(), "nnopt's evaluation text (Persuasion, volume II)"
    path = Path(text)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except OSError as exc:
        raise ConfigError(f"evaluation text {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"evaluation text {path}: not UTF-8 text") from None


def _try(name: str, plan: LLMPlan, src: Path, target: Path, reference: Any, ids: Any, window: int,
         eval_windows: int, source_ppl: float, max_increase: float, progress: StepProgress | None
         ) -> CandidateResult:
    """Run one candidate and measure it; a plan that cannot run on this model is recorded, not fatal."""
    import torch

    from nnopt.llm.plan import describe_plan, plan_to_dict, run_plan
    from nnopt.llm.source import load_causal_lm

    base = CandidateResult(name=name, description=describe_plan(plan), recipe=plan_to_dict(plan),
                           expected_bits=expected_bits(plan))
    try:
        written = run_plan(plan, src, target, progress=progress)
        candidate = load_causal_lm(target, dtype=torch.float32, tokenizer=False, progress=False).model
        scores = _measure(candidate, reference, ids, window, eval_windows)
        del candidate  # one candidate model in memory at a time
    except NnoptError as exc:  # e.g. a group of 128 inputs in a model whose layers have 64
        return dataclasses.replace(base, error=str(exc).replace(str(target), f"candidate {name}"))
    increase = scores.perplexity / source_ppl - 1
    return dataclasses.replace(
        base, perplexity=scores.perplexity, increase=increase, kl_mean=scores.kl_mean,
        output_bytes=written["output_bytes"], seconds=written["seconds"], eval_seconds=scores.seconds,
        meets_budget=increase <= max_increase)


def _held_out(model_dir: Path, reference: Any, ids: Any, window: int, eval_windows: int) -> dict[str, Any] | None:
    """The chosen checkpoint and the source on up to ``eval_windows`` windows of ``ids`` (the tokens after
    the selection windows): the selection windows chose the plan, so their figures are biased in its favour.
    None when not one window is left."""
    import torch

    from nnopt.llm import quality
    from nnopt.llm.source import load_causal_lm

    if ids.numel() < window:
        return None
    source = quality.evaluate(reference, ids, window=window, max_windows=eval_windows)
    chosen = load_causal_lm(model_dir, dtype=torch.float32, tokenizer=False, progress=False).model
    scores = _measure(chosen, reference, ids, window, eval_windows)
    return {"windows": scores.windows, "source_perplexity": source.perplexity, "perplexity": scores.perplexity,
            "increase": scores.perplexity / source.perplexity - 1, "kl_mean": scores.kl_mean}


def _measure(model: Any, reference: Any, ids: Any, window: int, eval_windows: int) -> Any:
    """Perplexity of ``model`` and its KL from ``reference`` on the evaluation windows."""
    from nnopt.llm import quality

    return quality.evaluate(model, ids, reference=reference, window=window, max_windows=eval_windows)


def _line(r: CandidateResult) -> str:
    if r.error is not None:
        return f"           could not run: {r.error}"
    assert r.perplexity is not None and r.increase is not None and r.output_bytes is not None
    verdict = "within the budget" if r.meets_budget else "over the budget"
    return (f"           perplexity {r.perplexity:.4f} ({r.increase:+.2%}), KL {r.kl_mean:.5f}, "
            f"{r.output_bytes:,} bytes, {r.seconds:.1f} s: {verdict}")


def report_markdown(result: AutoResult) -> str:
    """A small Markdown table of every candidate tried."""
    lines = [
        "# nnopt llm auto", "",
        f"Source perplexity {result.source_perplexity:.4f}, {result.source_bytes:,} bytes; budget: perplexity "
        f"increase at most {result.max_increase:.2%}. Objective: size (measured bytes of the safetensors "
        "written).", "",
        f"Method: {result.method}.", "",
        "| candidate | plan | perplexity | increase | KL mean | bytes | seconds | within budget | chosen |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result.candidates:
        if r.error is not None:
            lines.append(f"| {r.name} | {r.description} | - | - | - | - | - | could not run: {r.error} | |")
            continue
        lines.append(f"| {r.name} | {r.description} | {r.perplexity:.4f} | {r.increase:+.2%} | {r.kl_mean:.5f} | "
                     f"{r.output_bytes:,} | {r.seconds:.1f} | {'yes' if r.meets_budget else 'no'} | "
                     f"{'**yes**' if r.chosen else ''} |")
    lines.append("")
    if result.not_tried:
        lines.append(f"Not tried (expected at least as big as the chosen one): {', '.join(result.not_tried)}.")
    lines.append(f"Chosen: {result.chosen}." if result.chosen else "No candidate meets the budget (exit status 3).")
    if result.held_out is not None:
        h = result.held_out
        lines.append(f"Held out: on the {h['windows']} windows after the selection windows, which did not take part "
                     f"in the choice, the chosen plan's perplexity is {h['perplexity']:.4f} ({h['increase']:+.2%} "
                     f"over the source's {h['source_perplexity']:.4f}), KL {h['kl_mean']:.5f}.")
    lines.append(f"Peak RSS {result.peak_rss_bytes / 2**20:,.0f} MiB (measured: this process's high-water mark).")
    return "\n".join(lines) + "\n"
