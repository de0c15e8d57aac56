"""A small ResNet-style CNN for 8×8 single-channel images (scikit-learn digits)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.models.registry import register_architecture


@dataclasses.dataclass(frozen=True)
class ResNetConfig(Config):
    kind = "resnet"
    in_channels: int = 1
    image_size: int = 8
    widths: tuple[int, ...] = (16, 32)
    num_classes: int = 10
    seed: int | None = None

    def validate(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"ResNetConfig.widths: need one or more widths >= 1, got {self.widths}")
        if self.image_size < 2 ** (len(self.widths) - 1):
            raise ConfigError("ResNetConfig.image_size is too small for the number of stages")


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2 = conv_bn(c_out, c_out, 3, 1)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if (stride != 1 or c_in != c_out) else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, one BasicBlock per width (stride 2 after the first), global pool, classifier."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.config = config
        self.input_shape = (config.in_channels, config.image_size, config.image_size)
        first = config.widths[0]
        self.stem = nn.Sequential(conv_bn(config.in_channels, first, 3, 1), nn.ReLU())
        blocks = []
        c_in = first
        for i, width in enumerate(config.widths):
            blocks.append(BasicBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accept flat (batch, C*H*W) rows as well as (batch, C, H, W) images.
        x = x.reshape(x.shape[0], *self.input_shape)
        x = self.pool(self.blocks(self.stem(x))).flatten(1)  # (batch, widths[-1])
        return self.classifier(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=-1)


register_architecture(
    "resnet8", ResNetConfig, ResNet, "small ResNet-style CNN for 8x8 images (stem + 2 residual blocks)"
)
