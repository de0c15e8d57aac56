"""Four models written in plain PyTorch, as a user would write them: nnopt has never seen them.

They import nothing from nnopt. The examples beside this file, ``benchmarks/own_models.py`` and
the tests build them to show every technique on models outside nnopt's registry:

- :class:`TimeSeriesCNN`: a 1-D CNN for time series (Conv1d → BatchNorm1d → ReLU ×3, pooling, Linear);
- :class:`MobileNetSE`: a MobileNetV2-style image CNN (inverted residuals with depthwise
  convolutions, ReLU6/Hardswish, squeeze-and-excitation);
- :class:`TinyViT`: a ViT-style encoder (patch embedding, ``nn.MultiheadAttention``, GELU MLP, LayerNorm);
- :class:`LSTMClassifier`: an Embedding → LSTM → Linear text classifier.
"""

from __future__ import annotations

import torch
from torch import nn


class TimeSeriesCNN(nn.Module):
    """(batch, channels, length) → (batch, classes)."""

    def __init__(self, in_channels: int = 3, classes: int = 5, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out in (width, 2 * width, 2 * width):
            layers += [nn.Conv1d(channels, out, kernel_size=5, padding=2), nn.BatchNorm1d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class SqueezeExcite(nn.Module):
    """Channel attention: the input times a per-channel gate computed from its global average."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise → (SE) → 1×1 project, with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.se = SqueezeExcite(hidden, max(8, hidden // 4)) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.use_skip else y


class MobileNetSE(nn.Module):
    """(batch, 3, H, W) images → (batch, classes); H and W any size ≥ 32."""

    # (expansion, output channels, blocks, first stride, squeeze-excite)
    STAGES = ((1, 16, 1, 1, False), (6, 24, 2, 2, False), (6, 32, 3, 2, True), (6, 64, 3, 2, True), (6, 96, 2, 1, True))

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        blocks: list[nn.Module] = []
        cin = width
        for expand, cout, repeats, stride, se in self.STAGES:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand, se))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(nn.Conv2d(cin, 320, 1, bias=False), nn.BatchNorm2d(320), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(320, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """(batch, channels, size, size) images → (batch, classes), patches of ``patch``×``patch``."""

    def __init__(self, image: int = 32, patch: int = 4, channels: int = 3, classes: int = 10,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, patches, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class LSTMClassifier(nn.Module):
    """(batch, tokens) integer ids → (batch, classes)."""

    def __init__(self, vocab: int = 1000, embed: int = 64, hidden: int = 128, classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embedding(ids))
        return self.head(h[-1])
