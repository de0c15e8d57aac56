"""Generated data for the examples and benchmarks of user models: each class decides a pattern in
the input, so that a model trained on it learns something and its outputs mean something.

Nothing is downloaded. Each function returns ``(x, y)`` for ``n`` samples, reproducible from ``seed``.
"""

from __future__ import annotations

import torch


def signals(n: int, seed: int, length: int = 1024, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, length) noisy sines whose frequency is the class (periods of 25 down to about 5 samples, so that
    a few small convolutions can tell them apart)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    t = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(n, 3, 1, generator=g) * 6.28
    cycles_per_sample = 0.04 + 0.15 * y[:, None, None] / max(classes - 1, 1)
    x = torch.sin(2 * torch.pi * cycles_per_sample * t + phase) + 0.5 * torch.randn(n, 3, length, generator=g)
    return x, y


def images(n: int, seed: int, size: int = 224, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) noise with a bright square whose colour channel and quadrant are the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    half = size // 2
    for i, label in enumerate(y.tolist()):
        channel, quadrant = label % 3, label % 4
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        x[i, channel, top + half // 4: top + 3 * half // 4, left + half // 4: left + 3 * half // 4] += 1.5
    return x, y


def token_ids(
    n: int, seed: int, length: int = 64, vocab: int = 10000, classes: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, length) ids: 60% drawn from the class's quarter of the vocabulary, the rest uniform."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    band = vocab // classes
    own = y[:, None] * band + torch.randint(0, band, (n, length), generator=g)
    uniform = torch.randint(0, vocab, (n, length), generator=g)
    mixed = torch.where(torch.rand(n, length, generator=g) < 0.6, own, uniform)
    return mixed, y
