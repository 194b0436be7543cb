"""CIFAR ResNets (He et al. 2016) with the parameter-free "option A" shortcut.

Parameter names follow the akamaster/pytorch_resnet_cifar10 checkpoints so they load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantization.units import register_unit_type
from .registry import register_model
from .spec import CIFAR_SPEC_MEAN, CIFAR_SPEC_STD, DataSpec

CIFAR10_SPEC = DataSpec(mean=CIFAR_SPEC_MEAN, std=CIFAR_SPEC_STD, input_size=32, num_classes=10)
_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_SOURCE = "akamaster/pytorch_resnet_cifar10"


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels; a Module (not a lambda) so it pickles."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


@register_unit_type
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes // 4) if changes_shape else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Three stages of ``n`` BasicBlocks (16/32/64 channels), global average pooling, Linear."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _register(depth: int, file_name: str) -> None:
    sha_prefix = file_name.rsplit("-", 1)[1].split(".")[0]  # the publisher names files by sha256 prefix

    def factory() -> nn.Module:
        return CifarResNet(depth, 10)

    factory.__name__ = f"resnet{depth}_cifar10"
    register_model(factory.__name__, spec=CIFAR10_SPEC, weights_url=_URL + file_name, sha256=sha_prefix,
                   source=_SOURCE)(factory)


for _depth, _file in [(20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th"),
                      (44, "resnet44-014dd654.th"), (56, "resnet56-4bfd9763.th"),
                      (110, "resnet110-1d1ed7c2.th")]:
    _register(_depth, _file)
