"""``nnopt advise``: which techniques nnopt can apply without data make a saved model faster here, measured.

For the saved model and this device, the candidate variants that need no data are built: the fp32
baseline, bf16 autocast (float models), int8 dynamic (models with Linear layers), BatchNorm folding
(models with BatchNorm), CSR sparse kernels via ``sparsify`` (a Linear with >= 50 % zeros) and,
on request, ``torch.compile`` and other runtimes (``runtimes=True``: the same model exported to ONNX
and run by ONNX Runtime and by OpenVINO, where installed; :mod:`nnopt.metrics.runtimes`). All are timed
side by side with :func:`nnopt.metrics.speed.compare_calls` (alternated rounds, so drift in the machine's speed falls
on all alike) at one batch size, and their outputs are checked against the baseline on the same
seeded random inputs (max abs difference and argmax agreement; cosine similarity for models that
bring their own ``example_inputs``, such as the MiniLM encoder). A technique is "faster here" when
its measured speed-up is >= 1.05x and its outputs agree; otherwise the row says "no speed-up here"
and gives a reason computed from facts about the model and this CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError, NnoptError
from nnopt.metrics.speed import MIN_SPEEDUP, bind_call

MIN_ARGMAX_AGREEMENT = 0.9  # share of random inputs whose top class matches the baseline's
# per-example cosine of embeddings (encoders) with the baseline's: the repository's int8 MiniLM fidelity gate
MIN_COSINE_MEAN = 0.995
MIN_COSINE = 0.98
SPARSE_MIN_ZEROS = 0.5  # CSR kernels are only tried on a model with a Linear at least this sparse
CSR_PAYS_OFF = 0.9  # sparsity below which CSR kernels rarely beat dense GEMM on a CPU
SMALL_LAYER = 128  # Linear layers at most this wide: per-call activation quantization dominates int8
FASTER = "faster here"
NOT_FASTER = "no speed-up here"


@dataclasses.dataclass(frozen=True)
class AdviseOptions:
    """What to measure. ``threads`` None: the process's current ``torch.get_num_threads()``."""

    batch: int = 32
    threads: int | None = None
    seconds: float = 1.0
    device: str = "cpu"
    compile: bool = False
    runtimes: bool = False
    min_calls: int = 20
    warmup: int = 5
    rounds: int = 5

    def validate(self) -> None:
        if self.batch < 1:
            raise ConfigError(f"--batch must be an integer >= 1, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be an integer >= 1, got {self.threads}")
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ConfigError(f"--seconds must be a number >= 0, got {self.seconds}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"unknown device {self.device!r}; choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine; use --device cpu")
        if self.min_calls < 1 or self.warmup < 1 or self.rounds < 1:
            raise ConfigError("min_calls, warmup and rounds must be >= 1")


@dataclasses.dataclass(frozen=True)
class AdviceResult:
    """One ``advise`` run: a row per technique timed, the techniques not tried and why, and the env."""

    workload: str
    env: dict[str, Any]
    advice: tuple[dict[str, Any], ...]
    skipped: tuple[dict[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"advice": [dict(r) for r in self.advice], "skipped": [dict(s) for s in self.skipped],
                "env": self.env}

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        columns = ("technique", "median ms (measured)", "p10-p90 ms", "speed-up (measured)", "output agreement",
                   "verdict")
        rows = [(r["technique"], r["latency_ms_median"],
                 "-" if r["latency_ms_p10"] is None else f"{r['latency_ms_p10']:.4g}-{r['latency_ms_p90']:.4g}",
                 None if r["speedup"] is None else f"{r['speedup']:.2f}x", r["agreement"]["summary"], r["verdict"])
                for r in self.advice]
        env = self.env
        lines = [
            f"on {env['device']} ({env['cpu']}), {env['threads']} thread{'s' if env['threads'] != 1 else ''}, "
            f"batch {env['batch']}; {env['timing_method']}",
            f"speed-up = baseline median / technique median (measured); '{FASTER}' needs >= {MIN_SPEEDUP}x and "
            "outputs that agree with the baseline",
            f"agreement: {env['agreement_method']}",
        ]
        if env.get("int8_kernels"):
            lines.append(f"ISA class {env.get('isa', 'unknown')}; int8 kernels (known-answer check on this machine): "
                         + "; ".join(f"{name} {summary}" for name, summary in env["int8_kernels"].items()))
        if env.get("compile_seconds") is not None:
            lines.append(f"torch.compile took {env['compile_seconds']:.2f} s (measured), not in the timings")
        before, after = env.get("load_average") or (None, None)
        if before is not None and after is not None:
            lines.append(f"machine load (1-min average) {before:.2f} at start, {after:.2f} at end, on "
                         f"{env['logical_cores']} logical cores; other work inflates and spreads timings")
        reasons = [f"  {r['technique']}: {r['reason']}" for r in self.advice if r.get("reason")]
        if reasons:
            lines += ["why:", *reasons]
        if self.skipped:
            lines += ["not tried:", *(f"  {s['technique']}: {s['reason']}" for s in self.skipped)]
        from rich.markup import escape

        # plain text, not rich markup: a reason such as "pip install 'nnopt[openvino]'" must print as written
        return render_table(columns, rows, title=f"nnopt advise: {self.workload}", caption=escape("\n".join(lines)))


@dataclasses.dataclass
class _Candidate:
    key: str
    technique: str
    call: Callable[[], object]
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_advise(path: str | Path, options: AdviseOptions) -> AdviceResult:
    """Build, time and check every data-free technique for the saved model at ``path``."""
    from nnopt.cpu import cpu_features
    from nnopt.envinfo import environment
    from nnopt.io.model_dir import read_meta
    from nnopt.layers.kernel_checks import check_all
    from nnopt.loading import load_model
    from nnopt.metrics.speed import compare_calls
    from nnopt.pipeline.bench import _inputs, _load_average

    options.validate()
    path = Path(path)
    meta = read_meta(path)
    model = load_model(path).eval().to(options.device)
    workload = path.resolve().name
    previous_threads = torch.get_num_threads()
    threads = options.threads or previous_threads
    load_before = _load_average()
    try:
        torch.set_num_threads(threads)
        inputs = _inputs(model, options.batch, options.device)
        encoder = callable(getattr(model, "example_inputs", None))
        facts = _model_facts(model)
        features = cpu_features()
        candidates, skipped = _candidates(model, inputs, options, facts)
        compile_seconds = None
        with torch.inference_mode():
            if options.compile:
                compiled, compile_seconds, why = _compiled(model, inputs)
                if compiled is None:
                    skipped.append({"technique": "torch.compile", "reason": why})
                else:
                    candidates.append(_Candidate("compiled", "torch.compile (fp32)", compiled))
            if options.runtimes:
                _add_runtimes(model, inputs, threads, options, candidates, skipped)
            from nnopt.metrics.runtimes import first_output

            outputs = {c.key: first_output(c.call()) for c in candidates}
            timings = compare_calls({c.key: c.call for c in candidates}, options.batch, warmup=options.warmup,
                                    min_calls=options.min_calls, min_seconds=options.seconds,
                                    rounds=options.rounds, device=options.device)
    finally:
        torch.set_num_threads(previous_threads)
        if options.compile:
            torch.compiler.reset()
    base_ms = timings[candidates[0].key].median_ms
    advice = []
    for candidate in candidates:
        timing = timings[candidate.key]
        agreement = _agreement(outputs["fp32"], outputs[candidate.key], encoder)
        # rounded once, so the verdict, the reason and the JSON all use the same figure
        speedup = round(base_ms / timing.median_ms, 3) if timing.median_ms > 0 else None
        row: dict[str, Any] = {
            "technique": candidate.technique, "key": candidate.key, "method": "measured",
            "device": options.device, "threads": threads, "batch": options.batch,
            "latency_ms_median": _sig(timing.median_ms), "latency_ms_p10": _sig(timing.p10_ms),
            "latency_ms_p90": _sig(timing.p90_ms), "calls": timing.calls,
            "speedup": speedup, "agreement": agreement,
        }
        if candidate.key == "fp32":
            row.update(verdict="baseline", reason=None)
        else:
            faster = speedup is not None and speedup >= MIN_SPEEDUP and agreement["ok"]
            row["verdict"] = FASTER if faster else NOT_FASTER
            row["reason"] = None if faster else _reason(candidate, speedup or 0.0, agreement, facts, features,
                                                        options)
        row["facts"] = candidate.facts
        advice.append(row)
    env: dict[str, Any] = {
        **environment(options.device), "threads": threads, "batch": options.batch, "workload": workload,
        "architecture": meta["architecture"], "applied": [p.get("name") for p in meta["applied"]],
        "cpu_features": features, "logical_cores": os.cpu_count(),
        "int8_kernels": {check.kernel: check.summary() for check in check_all()},
        "timing_method": f"measured: median of time.perf_counter around each call, {options.warmup} warm-up calls, "
        f">= {options.min_calls} calls and >= {options.seconds} s per technique, alternated over {options.rounds} "
        "rounds (nnopt.metrics.compare_calls), torch.inference_mode",
        "agreement_method": (
            "measured: per-example cosine similarity of the outputs with the fp32 baseline's on the model's seeded "
            f"example inputs (ok: mean >= {MIN_COSINE_MEAN}, min >= {MIN_COSINE})" if encoder else
            "measured: max |output - baseline output| and share of rows with the same argmax on seeded "
            f"standard-normal inputs (ok: argmax agreement >= {MIN_ARGMAX_AGREEMENT:.0%})"),
        "load_average": [load_before, _load_average()],
    }
    runtime_setup = {c.key: c.facts["setup_seconds"] for c in candidates if "setup_seconds" in c.facts}
    if runtime_setup:
        env["runtime_setup_seconds"] = runtime_setup
        env["runtime_setup_method"] = ("measured: ONNX export, then session creation (ONNX Runtime) or conversion and "
                                       "compilation for the CPU (OpenVINO), not in the timings")
    if compile_seconds is not None:
        env["compile_seconds"] = round(compile_seconds, 3)
        env["compile_method"] = "measured: torch.compile plus its first call (tracing and code generation)"
    return AdviceResult(workload, env, tuple(advice), tuple(skipped))


def _sig(value: float) -> float:
    return float(f"{value:.6g}")


def _model_facts(model: nn.Module) -> dict[str, Any]:
    """What the reasons are computed from: Linear widths and sparsity, BatchNorm count, float parameters."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    widths = [m.in_features for _, m in linears]
    sparsity = {name: float((m.weight == 0).float().mean()) for name, m in linears if m.weight.numel()}
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    linear_params = sum(m.weight.numel() for _, m in linears)
    conv_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    return {
        "linear_layers": len(linears), "max_linear_in_features": max(widths, default=0),
        "max_linear_sparsity": max(sparsity.values(), default=0.0), "linear_sparsity": sparsity,
        "batchnorm_layers": batchnorms, "linear_weight_share": (
            linear_params / (linear_params + conv_params) if linear_params + conv_params else 0.0),
        "float": any(p.dtype == torch.float32 for p in model.parameters()),
    }


def _candidates(model: nn.Module, inputs: Any, options: AdviseOptions,
                facts: Mapping[str, Any]) -> tuple[list[_Candidate], list[dict[str, str]]]:
    """The data-free variants of ``model``; those that do not apply are listed with why."""
    from nnopt.cpu import bf16_support
    from nnopt.pipeline.bench import autocast_call

    candidates = [_Candidate("fp32", "fp32 baseline", bind_call(model, inputs))]
    skipped: list[dict[str, str]] = []

    native, why = bf16_support(options.device)
    if facts["float"] and native is False:  # emulated bf16 can take minutes to time and is never the answer
        skipped.append({"technique": "bf16 autocast", "reason": f"not timed: {why}, so bf16 would be emulated"})
    elif facts["float"]:
        candidates.append(_Candidate("bf16", "bf16 autocast", autocast_call(bind_call(model, inputs), options.device),
                                     {"bf16_native": native, "bf16_support": why}))
    else:
        skipped.append({"technique": "bf16 autocast", "reason": "the model has no float32 parameters"})

    if facts["linear_layers"]:
        built = _try(lambda: _quantized(model), "int8 dynamic", skipped)
        if built is not None:
            candidates.append(_Candidate("int8", "int8 dynamic (Linear)", bind_call(built, inputs), {
                "linear_layers": facts["linear_layers"], "max_linear_in_features": facts["max_linear_in_features"]}))
    else:
        skipped.append({"technique": "int8 dynamic", "reason": "the model has no float Linear layer"})

    if facts["batchnorm_layers"]:
        built = _try(lambda: _folded(model), "BatchNorm folding", skipped)
        if built is not None:
            left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built.modules())
            candidates.append(_Candidate("bn-fold", "BatchNorm folding", bind_call(built, inputs), {
                "batchnorm_layers": facts["batchnorm_layers"], "batchnorm_folded": facts["batchnorm_layers"] - left}))
    else:
        skipped.append({"technique": "BatchNorm folding", "reason": "the model has no BatchNorm layer"})

    max_zeros = facts["max_linear_sparsity"]
    if max_zeros >= SPARSE_MIN_ZEROS:
        built = _try(lambda: _sparse(model, options), "CSR sparse kernels", skipped)
        if built is not None:
            from nnopt.sparse import SparseLinear

            chosen = [name for name, m in built.named_modules() if isinstance(m, SparseLinear)]
            if chosen:
                candidates.append(_Candidate("csr", "CSR sparse kernels", bind_call(built, inputs), {
                    "csr_layers": chosen, "max_linear_sparsity": round(max_zeros, 4)}))
            else:
                skipped.append({"technique": "CSR sparse kernels", "reason": (
                    f"sparsify measured every Linear slower with CSR than dense at batch {options.batch} "
                    f"(highest sparsity {max_zeros:.0%}{'' if max_zeros >= CSR_PAYS_OFF else f' < ~{CSR_PAYS_OFF:.0%}'}"
                    "), so it keeps the model dense: nothing to gain here")})
    else:
        skipped.append({"technique": "CSR sparse kernels", "reason": (
            f"no Linear has >= {SPARSE_MIN_ZEROS:.0%} zeros (highest {max_zeros:.0%}); prune first "
            "(nnopt prune --sparsity)" if facts["linear_layers"] else "the model has no Linear layer")})
    return candidates, skipped


RUNTIME_TECHNIQUES = {"onnxruntime": "ONNX Runtime (exported model)", "openvino": "OpenVINO (exported model, CPU)"}


def _add_runtimes(model: nn.Module, inputs: Any, threads: int, options: AdviseOptions, candidates: list[_Candidate],
                  skipped: list[dict[str, str]]) -> None:
    """ONNX Runtime and OpenVINO running the model exported to ONNX (the same weights: fp32 for a float model),
    at the same threads; each one that cannot run here is listed with why."""
    import importlib.util

    from nnopt.io.openvino_export import OPENVINO_FIX, openvino_available
    from nnopt.metrics.runtimes import build_runtime

    wanted = {}
    for key, technique in RUNTIME_TECHNIQUES.items():
        if options.device != "cpu":
            skipped.append({"technique": technique, "reason": "compared on the CPU only (use --device cpu)"})
        elif key == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            skipped.append({"technique": technique,
                            "reason": "onnxruntime is not installed; pip install 'nnopt[onnx]'"})
        elif key == "openvino" and not openvino_available():
            skipped.append({"technique": technique, "reason": f"openvino is not installed; {OPENVINO_FIX}"})
        else:
            wanted[key] = technique
    if not wanted:
        return
    started = time.perf_counter()
    try:
        from nnopt.io.onnx_export import export_onnx

        # int8 layers (if any) in the fastest form ONNX Runtime computes exactly on this CPU: a file timed here
        onnx = export_onnx(model, inputs, int8_weights="auto")
    except (NnoptError, ImportError) as exc:
        for technique in wanted.values():
            skipped.append({"technique": technique, "reason": f"ONNX export failed: {_first_line(exc)}"})
        return
    export_seconds = time.perf_counter() - started
    for key, technique in wanted.items():
        try:
            built = build_runtime(key, inputs, onnx=onnx, threads=threads)
            built.call()
        except Exception as exc:  # noqa: BLE001 - the runtimes raise many types; name the cause
            skipped.append({"technique": technique, "reason": f"could not run here: {_first_line(exc)}"})
            continue
        candidates.append(_Candidate(key, technique, built.call, {
            **built.details, "setup_seconds": round(export_seconds + built.setup_seconds, 3), "onnx_bytes": len(onnx)}))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _try(build: Callable[[], nn.Module], technique: str, skipped: list[dict[str, str]]) -> nn.Module | None:
    try:
        return build()
    except (NnoptError, ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        skipped.append({"technique": technique, "reason": f"could not be applied: {first}"})
        return None


def _quantized(model: nn.Module) -> nn.Module:
    from nnopt.quantization import DynamicQuantConfig, quantize

    return quantize(copy.deepcopy(model), DynamicQuantConfig(), inplace=True).eval()


def _folded(model: nn.Module) -> nn.Module:
    from nnopt.simplification import FoldBatchNormConfig, simplify

    return simplify(copy.deepcopy(model), FoldBatchNormConfig(), inplace=True).eval()


def _sparse(model: nn.Module, options: AdviseOptions) -> nn.Module:
    from nnopt.sparse import SparseKernelConfig, sparsify

    layers = tuple(name for name, m in model.named_modules() if type(m) is nn.Linear
                   and float((m.weight == 0).float().mean()) >= SPARSE_MIN_ZEROS)
    config = SparseKernelConfig(batch_size=options.batch, min_seconds=min(options.seconds, 0.3), layers=layers)
    return sparsify(copy.deepcopy(model), config, inplace=True).eval()


def _compiled(model: nn.Module, inputs: Any) -> tuple[Callable[[], object] | None, float | None, str]:
    """``torch.compile(model)`` and its first call, timed as compile time; (None, None, why) if it fails."""
    started = time.perf_counter()
    try:
        call = bind_call(torch.compile(model), inputs)
        call()
    except Exception as exc:  # dynamo/inductor raise many types; name the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, None, f"torch.compile failed: {first}"
    return call, time.perf_counter() - started, ""


def _agreement(reference: torch.Tensor, output: torch.Tensor, encoder: bool) -> dict[str, Any]:
    """How closely ``output`` matches the baseline's: cosine per example (encoders), else max abs
    difference and argmax agreement."""
    if output.shape != reference.shape:
        return {"ok": False, "summary": f"shape {list(output.shape)} != {list(reference.shape)}"}
    flat_ref = reference.reshape(reference.shape[0], -1)
    flat_out = output.reshape(output.shape[0], -1)
    max_abs = float((flat_out - flat_ref).abs().max()) if flat_ref.numel() else 0.0
    if encoder:
        cosine = torch.nn.functional.cosine_similarity(flat_out, flat_ref, dim=1, eps=1e-12)
        cos_min, cos_mean = float(cosine.min()), float(cosine.mean())
        ok = math.isfinite(cos_min) and cos_min >= MIN_COSINE and cos_mean >= MIN_COSINE_MEAN
        summary = f"{'ok' if ok else 'NOT ok'}: cosine mean {cos_mean:.4f}, min {cos_min:.4f}"
        return {"ok": ok, "cosine_min": round(cos_min, 6), "cosine_mean": round(cos_mean, 6),
                "max_abs_diff": _sig(max_abs), "summary": summary}
    agree = float((flat_out.argmax(dim=1) == flat_ref.argmax(dim=1)).float().mean())
    ok = math.isfinite(max_abs) and agree >= MIN_ARGMAX_AGREEMENT
    return {"ok": ok, "max_abs_diff": _sig(max_abs), "argmax_agreement": round(agree, 4),
            "summary": f"{'ok' if ok else 'NOT ok'}: argmax {agree:.0%}, max |diff| {max_abs:.2g}"}


def _reason(candidate: _Candidate, speedup: float, agreement: Mapping[str, Any], facts: Mapping[str, Any],
            features: Mapping[str, bool | None], options: AdviseOptions) -> str:
    """Why a technique brings no speed-up here, from facts about the model and the CPU."""
    measured = f"measured {speedup:.2f}x"
    if not agreement["ok"]:
        return (f"outputs disagree with the fp32 baseline on random inputs "
                f"({agreement['summary'].split(': ', 1)[-1]})"
                + (f", although {measured}; check accuracy on real data" if speedup >= MIN_SPEEDUP else ""))
    if candidate.key == "bf16":
        if facts["max_linear_in_features"] and facts["max_linear_in_features"] <= SMALL_LAYER \
                and facts["linear_weight_share"] > 0.5:
            return (f"{measured}: layers of at most {facts['max_linear_in_features']} inputs: casting activations "
                    "to and from bf16 costs more than the faster bf16 product saves")
        return (f"{measured} at batch {options.batch}: the casts to and from bf16 cost about what the bf16 "
                f"products save ({candidate.facts.get('bf16_support', '')})")
    if candidate.key == "int8":
        widest = facts["max_linear_in_features"]
        share = facts["linear_weight_share"]
        convs = (f"; Linear layers hold only {share:.0%} of the weights and int8 dynamic leaves the convolutions "
                 "in fp32") if share < 0.5 else ""
        if widest <= SMALL_LAYER:
            return (f"{measured}: layers of at most {widest} inputs: quantizing activations costs more than the "
                    f"int8 product saves{convs}")
        from nnopt.cpu import has_vnni
        from nnopt.layers.kernels import int8_gemm_path, why_not_int8

        path = int8_gemm_path(dynamic=True)
        if path not in ("onednn", "torch-int-mm"):
            return (f"{measured}: {why_not_int8(path)}, so int8 layers multiply their codes exactly in "
                    f"{path.split('-')[0]}, not with int8 products")
        if has_vnni() is False:
            return (f"{measured}: the CPU has no VNNI (AVX-512 VNNI, AVX-VNNI or AMX-INT8), so int8 products are "
                    "not faster")
        if facts["linear_weight_share"] < 0.5:
            return (f"{measured}: Linear layers hold only {facts['linear_weight_share']:.0%} of the weights; "
                    "int8 dynamic leaves the convolutions in fp32")
        return f"{measured} at batch {options.batch}: per-call activation quantization eats the int8 gain"
    if candidate.key == "csr":
        zeros = candidate.facts.get("max_linear_sparsity", facts["max_linear_sparsity"])
        if zeros < CSR_PAYS_OFF:
            return (f"{measured}: highest Linear sparsity {zeros:.0%} < ~{CSR_PAYS_OFF:.0%}: CSR index overhead "
                    "outweighs the skipped zeros")
        return f"{measured}: even at {zeros:.0%} zeros the CSR kernels do not beat dense GEMM at batch {options.batch}"
    if candidate.key == "bn-fold":
        return (f"{measured}: the {candidate.facts.get('batchnorm_folded', 0)} BatchNorm layers folded away cost "
                f"less than the timing noise at batch {options.batch}")
    if candidate.key == "compiled":
        return f"{measured}: eager kernels already dominate; fusion saves too little at batch {options.batch}"
    if candidate.key in RUNTIME_TECHNIQUES:
        return (f"{measured} at batch {options.batch}: this runtime's kernels and graph fusions run this model no "
                "faster than torch eager here")
    return f"{measured} (< {MIN_SPEEDUP}x)"


__all__ = ["FASTER", "MIN_SPEEDUP", "NOT_FASTER", "AdviceResult", "AdviseOptions", "run_advise"]
