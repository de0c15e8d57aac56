"""llm: issue 20's whole table in one run — quality, speed and memory of decoder-only LMs, joined.

Runs the three LLM benchmarks, each in its own process (their peak RSS and thread settings stay their own),
one after the other on the same machine, then joins their rows into ``results/llm.json`` and ``llm.md``:

- ``quality`` (``llm_quality.py``): SmolLM2-135M perplexity on held-out text and mean next-token KL against
  fp32, for every quantization and pruning method, each written by nnopt's layer-by-layer pipeline in a
  fresh subprocess (its peak RSS is that run's).
- ``speed`` (``llm_speed.py``): batch-1 decode and 512-token prefill tokens/s per precision, the fraction of
  measured copy bandwidth, and llama.cpp on the same GGUF where its binaries are given (``--llama-cpp DIR``
  or ``NNOPT_LLAMA_CPP``).
- ``memory`` (``llm_memory.py``): peak RSS of streamed quantization of a 1.1B Llama-shaped fp32 model (RTN
  and GPTQ) and a 7B-shaped bf16 one (RTN), against the checkpoint's size.

Every joined row carries the protocol's columns plus ``section``, ``perplexity``, ``kl_mean``,
``decode_tokens_per_s``, ``prefill_tokens_per_s`` and ``peak_rss_bytes`` (null where a section does not measure
it). ``--join-only`` joins the three existing results files without running anything (each section's own
environment, load average and time stay in ``env.sections``).

    python benchmarks/llm.py [--quick] [--threads 2] [--sections quality,speed,memory] [--join-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import log, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTIONS = {"quality": "llm_quality", "speed": "llm_speed", "memory": "llm_memory"}
COLUMNS = ("perplexity", "kl_mean", "decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes")
SHOWN = ("section", *COLUMNS, "bandwidth_fraction", "rss_fraction_of_source", "threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each section's --quick")
    parser.add_argument("--threads", type=int, default=2, help="threads for every section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: quality,speed,memory")
    parser.add_argument("--join-only", action="store_true", help="join the existing results files, run nothing")
    parser.add_argument("--llama-cpp", default=None, metavar="DIR",
                        help="built llama.cpp binaries for the speed section's peer (default: $NNOPT_LLAMA_CPP)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "llm.json")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        raise SystemExit(f"--sections: choose from {', '.join(SECTIONS)}, got {args.sections!r}")
    started = time.time()
    if not args.join_only:
        for section in sections:
            _run(section, args)
    rows, envs = _join(sections)
    write_results("llm", rows, args.out, extra_env={
        "sections": envs, "quick": args.quick, "joined_only": args.join_only,
        "seconds": None if args.join_only else round(time.time() - started, 1),
        "method": "measured: each section's own method (env.sections.*.method); this file joins their rows"},
        extra_columns=SHOWN)
    log(f"wrote {args.out} ({len(rows)} rows)")


def _run(section: str, args: argparse.Namespace) -> None:
    script = HERE / f"{SECTIONS[section]}.py"
    command = [sys.executable, str(script), "--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    if section == "speed" and args.llama_cpp:
        command += ["--llama-cpp", args.llama_cpp]
    log(f"{section}: {' '.join(command[1:])}")
    env = dict(os.environ)
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"{section} failed with exit code {completed.returncode}")


def _join(sections: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    envs: dict[str, Any] = {}
    for section in sections:
        path = HERE / "results" / f"{SECTIONS[section]}.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run the {section} section first")
        document = json.loads(path.read_text())
        envs[section] = document["env"]
        for source_row in document["rows"]:
            joined = {"section": section, **{column: source_row.get(column) for column in COLUMNS}}
            joined.update({k: v for k, v in source_row.items() if k not in joined})
            rows.append(joined)
    return rows, envs


if __name__ == "__main__":
    main()
