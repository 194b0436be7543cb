"""Genie's swing convolution: a random sub-pixel-free shift before every strided conv."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swing_shift(x: Tensor, offset: tuple[int, int], pad: int = 1) -> Tensor:
    """Reflect-pad by `pad` and crop back to the input size starting at (row, col) = offset.

    offset (pad, pad) returns the input unchanged.
    """
    dy, dx = offset
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return padded[..., dy:dy + h, dx:dx + w]


class SwingConv2d(nn.Module):
    """Wraps a strided Conv2d; each call shifts its whole input batch by one random offset."""

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator, pad: int = 1) -> None:
        super().__init__()
        self.conv = conv
        self.generator = generator
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        # Offsets come from a CPU generator: reproducible and no device sync.
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,), generator=self.generator).tolist()
        return self.conv(swing_shift(x, (dy, dx), self.pad))


def _is_strided_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)


def _wrap(module: nn.Module, generator: torch.Generator) -> None:
    for name, child in module.named_children():
        if _is_strided_conv(child):
            setattr(module, name, SwingConv2d(child, generator))
        else:
            _wrap(child, generator)


def swing_model(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Deep copy of `model` with every Conv2d of stride > 1 wrapped in SwingConv2d.

    All wrappers share `generator` (a CPU torch.Generator); reseed it to replay the offsets.
    """
    out = copy.deepcopy(model)
    _wrap(out, generator if generator is not None else torch.Generator())
    return out
