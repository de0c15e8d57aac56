"""Held-out English text for language models, shipped with nnopt (nothing downloaded).

The text is Jane Austen's *Persuasion* (1818, public domain; origin and checksum in
``nnopt/resources/llm_text/README.md``), split at the novel's own division: volume I (chapters 1–12) is
the calibration text, volume II (chapters 13–24) the evaluation text. The split is by whole chapters, so
no sentence is in both. Inside a paragraph, line wraps and runs of spaces (the e-text puts two
after a full stop) become one space; paragraphs are separated by a blank line.

>>> calibration_text()[:20], evaluation_text()[:10]
('Chapter 1\\n\\nSir Walte', 'Chapter 13')
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import re
from typing import Any

import torch

from nnopt.errors import ConfigError

TEXT_FILE = "llm_text/persuasion.txt.gz"
CALIBRATION_CHAPTERS = range(1, 13)  # volume I
EVALUATION_CHAPTERS = range(13, 25)  # volume II
_HEADING = re.compile(r"^Chapter (\d+)$", re.MULTILINE)


@functools.cache
def chapters() -> dict[int, str]:
    """Chapter number → its text (heading included), from the shipped file."""
    raw = importlib.resources.files("nnopt.resources").joinpath(TEXT_FILE).read_bytes()
    text = gzip.decompress(raw).decode("ascii")
    text = text.split("\nFinis", 1)[0]
    marks = list(_HEADING.finditer(text))
    found: dict[int, str] = {}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        found[int(mark.group(1))] = _unwrap(text[mark.start():end])
    return found


def _unwrap(text: str) -> str:
    paragraphs = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def calibration_text() -> str:
    """Volume I of *Persuasion* (chapters 1–12): for calibrating quantizers and pruners."""
    return "\n\n".join(chapters()[n] for n in CALIBRATION_CHAPTERS)


def evaluation_text() -> str:
    """Volume II of *Persuasion* (chapters 13–24): for perplexity and KL; never used for calibration."""
    return "\n\n".join(chapters()[n] for n in EVALUATION_CHAPTERS)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The token ids of ``text`` as one ``(n,)`` int64 tensor, without special tokens (no BOS/EOS added)."""
    # verbose=False: the text is longer than the model's context on purpose (it is cut into windows next)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokenizer: Any, text: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    """``text`` tokenized and cut into consecutive, non-overlapping windows: ``(n_windows, window)`` int64.
    The tokens after the last whole window are dropped; ``max_windows`` keeps the first ones."""
    return split_windows(tokenize(tokenizer, text), window, max_windows)


def split_windows(ids: torch.Tensor, window: int, max_windows: int | None = None) -> torch.Tensor:
    """A ``(n,)`` id sequence as ``(n // window, window)`` consecutive windows (at most ``max_windows``)."""
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be >= 1, got {max_windows}")
    count = ids.numel() // window
    if count == 0:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * window].reshape(count, window).clone()
