"""llama.cpp as the peer: its own tools, built by the user, timed and asked for perplexity on a GGUF file.

nnopt does not build or ship llama.cpp. Point ``--llama-cpp DIR`` or the environment variable
``NNOPT_LLAMA_CPP`` at a directory holding its built binaries (``llama-bench``, ``llama-perplexity``; a CMake
build puts them in ``build/bin``). Each function returns ``(result, reason)``: a dict and ``""`` when it ran,
or ``None`` and one sentence saying why not (no directory given, a binary missing, the tool failed: its last
lines of output are quoted).

- :func:`bench` runs ``llama-bench -m FILE -p P -n N -t T1,T2 -r R -o json``: prefill is its ``ppP`` test
  (one batch of P tokens from an empty cache) and decode its ``tgN`` test (N single-token steps after an
  empty prompt), tokens/s averaged over R repetitions (``avg_ts``, ``stddev_ts``, ``samples_ts`` as it
  reports them).
- :func:`perplexity` runs ``llama-perplexity -m FILE -f TEXT -c C --chunks K``: the text is tokenized whole,
  cut into K chunks of C tokens (a BOS first where the file asks for one), and only the second half of each
  chunk is scored, C/2 - 1 tokens a chunk, so its figure is not nnopt's (which scores whole windows) even on
  the same text; compare files with one tool at a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV_VAR = "NNOPT_LLAMA_CPP"
BENCH, PERPLEXITY, CLI = "llama-bench", "llama-perplexity", "llama-cli"
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf) \+/- ([0-9.]+|nan|inf)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")
_RUNNING = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf),")


def binaries_dir(directory: str | Path | None = None) -> tuple[Path | None, str]:
    """The directory of llama.cpp binaries: ``directory`` if given, else ``$NNOPT_LLAMA_CPP``; ``(None, why)``
    when neither is set or it is not a directory."""
    chosen = directory if directory not in (None, "") else os.environ.get(ENV_VAR)
    if not chosen:
        return None, (f"llama.cpp not run: no --llama-cpp DIR and {ENV_VAR} is not set (build llama.cpp and name "
                      "its bin directory)")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        return None, f"llama.cpp not run: {path} is not a directory"
    return path, ""


def tool(name: str, directory: str | Path | None = None) -> tuple[Path | None, str]:
    """The executable ``name`` (``llama-bench``, ``llama-perplexity``, ``llama-cli``) in the binaries dir."""
    found, why = binaries_dir(directory)
    if found is None:
        return None, why
    exe = found / name
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        return None, f"llama.cpp not run: no executable {name} in {found}"
    return exe, ""


def _run(command: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess[str] | None, str, float]:
    started, name = time.perf_counter(), Path(command[0]).name
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None, f"{name} ran past {timeout_s:.0f} s and was stopped", time.perf_counter() - started
    except OSError as exc:
        return None, f"{name} could not start: {exc}", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        return None, f"{name} exited {done.returncode}: {tail}", seconds
    return done, "", seconds


def bench(
    model: str | Path, directory: str | Path | None = None, *, threads: Sequence[int] = (1, 2),
    prompt_tokens: int = 512, gen_tokens: int = 64, repetitions: int = 3, timeout_s: float = 1800,
) -> tuple[dict[str, Any] | None, str]:
    """llama.cpp's prefill (``pp{prompt_tokens}``) and decode (``tg{gen_tokens}``) tokens/s on ``model`` at
    each thread count, from ``llama-bench -o json``.

    Returns ``{"by_threads": {T: {"prefill_tokens_per_s", "prefill_stddev", "decode_tokens_per_s",
    "decode_stddev"}}, "tests": [llama-bench's records, each with "samples_ts"], "model_type",
    "model_size", "model_n_params", "build", "cpu_info", "command", "seconds"}``."""
    exe, why = tool(BENCH, directory)
    if exe is None:
        return None, why
    command = [str(exe), "-m", str(model), "-p", str(prompt_tokens), "-n", str(gen_tokens),
               "-t", ",".join(str(t) for t in threads), "-r", str(repetitions), "-o", "json"]
    done, why, seconds = _run(command, timeout_s)
    if done is None:
        return None, why
    try:
        records = json.loads(done.stdout)
    except json.JSONDecodeError:
        return None, f"{BENCH} printed no JSON: {done.stdout[:200]!r}"
    if not isinstance(records, list) or not records:
        return None, f"{BENCH} reported no tests"
    by_threads: dict[int, dict[str, float]] = {}
    for r in records:
        entry = by_threads.setdefault(int(r["n_threads"]), {})
        kind = "prefill" if int(r.get("n_prompt", 0)) > 0 and int(r.get("n_gen", 0)) == 0 else "decode"
        entry[f"{kind}_tokens_per_s"] = float(r["avg_ts"])
        entry[f"{kind}_stddev"] = float(r["stddev_ts"])
    first = records[0]
    return {
        "by_threads": by_threads,
        "tests": records,
        "model_type": first.get("model_type"),
        "model_size": first.get("model_size"),
        "model_n_params": first.get("model_n_params"),
        "build": f"{first.get('build_number')} ({first.get('build_commit')})",
        "cpu_info": first.get("cpu_info"),
        "command": " ".join(command),
        "seconds": round(seconds, 1),
    }, ""


def perplexity(
    model: str | Path, text: str, directory: str | Path | None = None, *, context: int = 512, chunks: int = 16,
    threads: int = 2, batch: int | None = None, timeout_s: float = 1800,
) -> tuple[dict[str, Any] | None, str]:
    """llama.cpp's perplexity of ``model`` on ``text`` (written to a temporary file): ``chunks`` chunks of
    ``context`` tokens, the second half of each scored (see the module docstring).

    Returns ``{"perplexity", "plus_minus" (llama.cpp's standard error), "chunks", "context",
    "tokens_scored", "running" (the estimate after each chunk), "command", "seconds"}``. A text too short
    for ``chunks`` chunks gives fewer; one shorter than two chunks is refused by the tool."""
    exe, why = tool(PERPLEXITY, directory)
    if exe is None:
        return None, why
    with tempfile.TemporaryDirectory(prefix="nnopt-llamacpp-") as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        command = [str(exe), "-m", str(model), "-f", str(text_file), "-c", str(context), "--chunks", str(chunks),
                   "-t", str(threads)]
        if batch is not None:
            command += ["-b", str(batch)]
        done, why, seconds = _run(command, timeout_s)
    if done is None:
        return None, why
    output = done.stdout + "\n" + done.stderr
    final = _FINAL.search(output)
    if final is None:
        tail = " | ".join(output.strip().splitlines()[-4:])
        return None, f"{PERPLEXITY} gave no final estimate: {tail}"
    planned = _CHUNKS.search(output)
    used = int(planned.group(1)) if planned else chunks
    n_ctx = int(planned.group(2)) if planned else context
    return {
        "perplexity": float(final.group(1)),
        "plus_minus": float(final.group(2)),
        "chunks": used,
        "context": n_ctx,
        "tokens_scored": used * (n_ctx - n_ctx // 2 - 1),
        "running": [float(m.group(2)) for m in _RUNNING.finditer(output)],
        "command": " ".join(command[:1] + ["-m", str(model), "-f", "TEXT"] + command[5:]),
        "seconds": round(seconds, 1),
    }, ""
