"""Text helpers for sentence encoders: a built-in calibration/evaluation corpus and embedding fidelity.

``load_sentences()`` returns varied English sentences written for nnopt (no external data set, nothing
downloaded). ``embedding_fidelity`` compares a compressed encoder's embeddings with the original's.
"""

from __future__ import annotations

import dataclasses
import importlib.resources

import torch

SENTENCES_FILE = "sentences.txt"


def load_sentences() -> list[str]:
    """The built-in corpus: one sentence per line of ``nnopt/resources/sentences.txt``, blank lines skipped."""
    text = importlib.resources.files("nnopt.resources").joinpath(SENTENCES_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class FidelityStats:
    """Per-row cosine similarity between reference and candidate embeddings (1.0 = same direction)."""

    cosine_mean: float
    cosine_min: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> FidelityStats:
    """Cosine between row i of ``reference`` and row i of ``candidate``, both ``(n, d)`` with n >= 1."""
    if reference.ndim != 2 or reference.shape != candidate.shape or reference.shape[0] == 0:
        raise ValueError(f"embedding_fidelity needs two (n, d) tensors of the same shape with n >= 1, "
                         f"got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    # float64: a good compression moves cosines by ~1e-6, close to float32 rounding of the dot products.
    cosine = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=1)
    return FidelityStats(cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()), n=int(cosine.numel()))
