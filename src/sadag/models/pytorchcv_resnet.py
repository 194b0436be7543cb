"""CIFAR ResNets with a conv1x1+BN projection shortcut, named like pytorchcv's ``resnet*_cifar*``.

Module names mirror pytorchcv (``features.init_block.conv``, ``features.stageS.unitU.body.conv1.bn``,
``...identity_conv``, ``output``) so its published state_dicts load with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantization.units import register_unit_type
from .registry import register_model
from .spec import DataSpec

PYTORCHCV_MEAN = (0.4914, 0.4822, 0.4465)
PYTORCHCV_STD = (0.2023, 0.1994, 0.2010)
_RELEASES = "https://github.com/osmr/imgclsmob/releases/download/"
_SOURCE = "osmr/imgclsmob (pytorchcv)"


class ConvBlock(nn.Module):
    """Conv (no bias) + BN, with an optional ReLU named ``activ`` as in pytorchcv."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, activate: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activ: nn.Module = nn.ReLU() if activate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activ(self.bn(self.conv(x)))


class ResBody(nn.Module):
    """conv3x3+BN+ReLU then conv3x3+BN (no activation: it comes after the residual add)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_ch, out_ch, 3, stride)
        self.conv2 = ConvBlock(out_ch, out_ch, 3, 1, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


@register_unit_type
class CifarResUnit(nn.Module):
    """Residual unit: body + (identity or 1x1 stride-s conv+BN projection), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = ResBody(in_ch, out_ch, stride)
        self.resize_identity = in_ch != out_ch or stride != 1
        if self.resize_identity:
            self.identity_conv = ConvBlock(in_ch, out_ch, 1, stride, activate=False)
        self.activ = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity_conv(x) if self.resize_identity else x
        return self.activ(self.body(x) + identity)


class PytorchcvCifarResNet(nn.Module):
    """init conv block, three stages of (depth-2)/6 units (16/32/64 channels), AvgPool2d(8), Linear."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.features = nn.Sequential()
        self.features.add_module("init_block", ConvBlock(3, 16, 3))
        in_ch = 16
        for s, out_ch in enumerate((16, 32, 64)):
            stage = nn.Sequential()
            for u in range(n):
                stride = 2 if u == 0 and s > 0 else 1
                stage.add_module(f"unit{u + 1}", CifarResUnit(in_ch, out_ch, stride))
                in_ch = out_ch
            self.features.add_module(f"stage{s + 1}", stage)
        self.features.add_module("final_pool", nn.AvgPool2d(8, stride=1))
        self.output = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.flatten(self.features(x), 1))


def _register(name: str, depth: int, classes: int, release: str, error: str, sha1: str) -> None:
    # pytorchcv names release files "<model>-<error>-<sha1[:8]>.pth" and zips them; the sha1 is of the .pth.
    url = f"{_RELEASES}{release}/{name}-{error}-{sha1[:8]}.pth.zip"
    spec = DataSpec(mean=PYTORCHCV_MEAN, std=PYTORCHCV_STD, input_size=32, num_classes=classes)

    def factory() -> nn.Module:
        return PytorchcvCifarResNet(depth, classes)

    local = name if classes == 100 else name + "_bn"  # keep the plain cifar10 names for option-A models
    factory.__name__ = local
    register_model(local, spec=spec, weights_url=url, sha1=sha1, source=_SOURCE)(factory)


# (pytorchcv name, depth, classes, release tag, error code, sha1) from pytorchcv's model_store.
for _args in [
    ("resnet20_cifar10", 20, 10, "v0.0.163", "0597", "9b0024ac4c2f374cde2c5052e0d0344a75871cdb"),
    ("resnet56_cifar10", 56, 10, "v0.0.163", "0452", "628c42a26fe347b84060136212e018df2bb35e0f"),
    ("resnet20_cifar100", 20, 100, "v0.0.180", "2964", "a5322afed92fa96cb7b3453106f73cf38e316151"),
    ("resnet56_cifar100", 56, 100, "v0.0.181", "2488", "d65f53b10ad5d124698e728432844c65261c3107"),
]:
    _register(*_args)
