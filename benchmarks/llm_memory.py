"""Peak memory of streaming RTN and layer-by-layer GPTQ int4 quantization on Llama-shaped checkpoints.

For each workload a Llama-shaped model with random weights (nnopt.llm.synthetic: TinyLlama-1.1B's shape
in fp32, Llama-2-7B's in bf16) is written as sharded safetensors into a work directory, then quantized to
int4 in groups of 128 in a fresh subprocess per run, so that the peak resident set (VmHWM,
``nnopt.llm.streaming.peak_rss_bytes``) is that run's alone: ``nnopt.llm.streaming.quantize_checkpoint_rtn``
for both models, and ``nnopt.llm.layerwise.quantize_checkpoint_gptq`` for the 1.1B one, once per
--gptq-batches value (calibration on --gptq-windows windows of 512 random token ids, the synthetic model
having no tokenizer: the memory and the time do not depend on which ids; the carried hidden states take
4 MiB per window, and a pass's activations about 55 MiB per window run at once, measured). The output is
spot-checked: layer 0's down_proj read back (RTN: within half a step of the source; both: its relative
error). The baseline row (1.1B only) is the peak RSS of loading the same checkpoint with transformers'
``from_pretrained`` and running one forward pass (which makes every weight resident), the usual first step
of non-streaming tools. Models are deleted afterwards unless --keep.

Issue 20's targets: the 7B-shaped bf16 model RTN-quantized to int4 with peak RSS ≤ 3 GiB; the 1.1B fp32
model GPTQ-quantized to int4 with peak RSS ≤ 25% of its fp32 size.
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

WORKLOADS = ("llama-1.1b-fp32", "llama-7b-bf16")
PRESET = {"llama-1.1b-fp32": "1.1b", "llama-7b-bf16": "7b"}
TARGET_RTN_BYTES = {"llama-7b-bf16": 3 << 30}
GPTQ_TARGET_FRACTION = 0.25  # of the fp32 checkpoint's size
GROUP, BITS = 128, 4
WINDOW = 512
SPOT = "model.layers.0.mlp.down_proj"
EXTRA = ("params", "source_bytes", "peak_rss_bytes", "peak_rss_gib", "rss_fraction_of_source", "seconds",
         "write_seconds", "target", "target_met", "spot_check_max_error_steps", "spot_check_rel_error")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--child-quantize", "--child-gptq", "--child-write", "--child-load"):
        print(json.dumps(_child(sys.argv[1], sys.argv[2:])), flush=True)
        return
    args, chosen = parse_args(
        __doc__ or "", "llm_memory", WORKLOADS, "the 1.1B model only, RTN only (about 3 minutes)",
        extra=((("--workdir",), {"type": Path, "default": None,
                                 "help": "where the models are written (default: a temp dir)"}),
               (("--keep",), {"action": "store_true", "help": "keep the written models"}),
               (("--gptq-windows",), {"type": int, "default": 8,
                                      "help": f"GPTQ calibration windows of {WINDOW} tokens (0: no GPTQ row)"}),
               (("--gptq-batches",), {"default": "1,2",
                                      "help": "GPTQ calibration windows run at once: one GPTQ row per value"})))
    args.gptq_batches = [int(b) for b in str(args.gptq_batches).split(",") if b]
    if args.quick:
        args.gptq_windows = 0
    if args.quick:
        chosen = [w for w in chosen if w == "llama-1.1b-fp32"]
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="nnopt-llm-memory-", dir=args.workdir))
    args.base = base
    try:
        runners = {w: (lambda a, w=w: _rows_for(a, w)) for w in chosen}
        rows, env = run_workloads(args, chosen, runners)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    write_results("llm_memory", rows, args.out, extra_columns=EXTRA, extra_env={
        **env, "quick": args.quick, "method": "peak RSS = VmHWM of a fresh subprocess per run "
                  "(ru_maxrss would keep the parent's peak); "
        "seconds = wall clock of quantize_checkpoint_rtn / quantize_checkpoint_gptq; sizes = bytes of the files; "
        "the subprocesses run with glibc malloc's defaults (the allocator line is this parent process's)",
        "gptq_calibration": {"windows": args.gptq_windows, "window": WINDOW, "batches": args.gptq_batches,
                             "tokens": "uniform random ids, seed 0"},
        "disk": _disk(base)})
    log(f"wrote {args.out} and {args.out.with_suffix('.md')} in {time.perf_counter() - started:.0f} s")


def _disk(path: Path) -> dict[str, Any]:
    usage = shutil.disk_usage(path.parent if not path.exists() else path)
    return {"free_bytes_at_end": usage.free}


def _run_child(mode: str, *argv: str, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, mode, *argv, str(threads)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(mode: str, argv: list[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(argv[-1]))
    if mode == "--child-write":
        from nnopt.llm.streaming import peak_rss_bytes
        from nnopt.llm.synthetic import write_synthetic_llama

        start = time.perf_counter()
        info = write_synthetic_llama(argv[0], argv[1])
        return {**info, "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}
    if mode == "--child-load":
        from transformers import AutoModelForCausalLM

        from nnopt.llm.streaming import peak_rss_bytes

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(argv[0], dtype="auto")
        params = sum(p.numel() for p in model.parameters())
        # transformers maps the files and reads weights on first use: one forward pass (what calibration
        # starts with) makes every weight resident.
        with torch.inference_mode():
            model(torch.ones(1, 8, dtype=torch.long))
        return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(), "params": params}
    from nnopt.quantization.weights import WeightQuantConfig

    config = WeightQuantConfig(bits=BITS, group_size=GROUP)
    if mode == "--child-gptq":
        from nnopt.llm.layerwise import CalibrationConfig, quantize_checkpoint_gptq

        windows, batch = int(argv[2]), int(argv[3])
        vocab = json.loads((Path(argv[0]) / "config.json").read_text())["vocab_size"]
        tokens = torch.randint(0, vocab, (windows, WINDOW), generator=torch.Generator().manual_seed(0))
        result = quantize_checkpoint_gptq(argv[0], argv[1], config, tokens=tokens,
                                          calibration=CalibrationConfig(windows=windows, window=WINDOW, batch=batch))
    else:
        from nnopt.llm.streaming import quantize_checkpoint_rtn

        result = quantize_checkpoint_rtn(argv[0], argv[1], config)
    result["spot_check_max_error_steps"], result["spot_check_rel_error"] = _spot_check(
        Path(argv[0]), Path(argv[1]), SPOT)
    return result


def _spot_check(src: Path, out: Path, module: str) -> tuple[float, float]:
    """Largest |source − dequantized output| of one matrix in units of its group's step (RTN: ≤ 0.5), and
    ‖source − dequantized‖ / ‖source‖."""
    import torch
    from safetensors import safe_open

    def find(directory: Path, name: str) -> torch.Tensor:
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(directory / index[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    w = find(src, f"{module}.weight").float()
    packed, step = find(out, f"{module}.weight_packed"), find(out, f"{module}.weight_scale")
    nibbles = packed.contiguous().view(torch.uint8)
    codes = torch.stack((nibbles & 0xF, nibbles >> 4), dim=-1).reshape(w.shape[0], -1)[:, : w.shape[1]]
    codes = codes.to(torch.float32) - 8
    step_full = step.repeat_interleave(w.shape[1] // step.shape[1], dim=1)
    error = codes * step_full - w
    return float((error.abs() / step_full).max()), float(error.norm() / w.norm())


def _rows_for(args: Any, workload: str) -> list[dict[str, Any]]:
    model_dir, out_dir = args.base / workload, args.base / f"{workload}-int4-g{GROUP}"
    log(f"{workload}: writing the synthetic model")
    written = _run_child("--child-write", str(model_dir), PRESET[workload], threads=args.threads)
    source_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    log(f"{workload}: {source_bytes / 1e9:.2f} GB in {written['seconds']:.0f} s; RTN in a subprocess")
    result = _run_child("--child-quantize", str(model_dir), str(out_dir), threads=args.threads)
    log(f"{workload}: peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, {result['seconds']:.0f} s")
    target = TARGET_RTN_BYTES.get(workload)
    rows = []
    if workload == "llama-1.1b-fp32":
        log(f"{workload}: baseline, transformers from_pretrained in a subprocess")
        loaded = _run_child("--child-load", str(model_dir), threads=args.threads)
        base = row(workload=workload, tool="baseline",
                   variant="transformers from_pretrained + one forward pass (whole model resident)",
                   file_bytes=source_bytes, params=written["parameters"])
        base.update(_memory_fields(loaded["peak_rss_bytes"], source_bytes, loaded["seconds"], written["parameters"]))
        rows.append(base)
    rows.append(_result_row(workload, f"RTN int{BITS} g{GROUP} symmetric, streaming (compressed-tensors "
                            "pack-quantized)", result, written, source_bytes,
                            None if target is None else (f"peak RSS <= {target / 2**30:g} GiB", target)))
    shutil.rmtree(out_dir, ignore_errors=True)
    for batch in args.gptq_batches if workload == "llama-1.1b-fp32" and args.gptq_windows > 0 else []:
        log(f"{workload}: GPTQ ({args.gptq_windows} windows of {WINDOW}, {batch} at a time) in a subprocess")
        result = _run_child("--child-gptq", str(model_dir), str(out_dir), str(args.gptq_windows), str(batch),
                            threads=args.threads)
        log(f"{workload}: peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, {result['seconds']:.0f} s")
        limit = int(GPTQ_TARGET_FRACTION * source_bytes)
        rows.append(_result_row(
            workload, f"GPTQ int{BITS} g{GROUP} symmetric, layer by layer, calibration {args.gptq_windows} x "
            f"{WINDOW} tokens, {batch} windows at a time (compressed-tensors pack-quantized)", result, written,
            source_bytes, (f"peak RSS <= {GPTQ_TARGET_FRACTION:g} x fp32 size ({limit / 2**30:.2f} GiB)", limit)))
        shutil.rmtree(out_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
    return rows


def _result_row(workload: str, variant: str, result: dict[str, Any], written: dict[str, Any], source_bytes: int,
                target: tuple[str, int] | None) -> dict[str, Any]:
    out = row(workload=workload, tool="nnopt", variant=variant, file_bytes=result["output_bytes"],
              params=written["parameters"])
    out.update(_memory_fields(result["peak_rss_bytes"], source_bytes, result["seconds"], written["parameters"]))
    out.update({"write_seconds": significant(written["seconds"], 3),
                "target": None if target is None else target[0],
                "target_met": None if target is None else result["peak_rss_bytes"] <= target[1],
                "spot_check_max_error_steps": significant(result["spot_check_max_error_steps"], 4),
                "spot_check_rel_error": significant(result["spot_check_rel_error"], 4),
                "output_shards": result["shards"]})
    return out


def _memory_fields(peak: int, source_bytes: int, seconds: float, params: int) -> dict[str, Any]:
    return {"peak_rss_bytes": peak, "peak_rss_gib": significant(peak / 2**30, 3), "source_bytes": source_bytes,
            "rss_fraction_of_source": significant(peak / source_bytes, 3), "seconds": significant(seconds, 3),
            "params": params}


if __name__ == "__main__":
    main()
