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
    """Wraps a strided Conv2d; each call shifts its input by one random offset per batch slice.

    `generators` holds one CPU generator per batch concatenated along N (equal slices); each slice is
    shifted by the offset its own generator draws, exactly as if that batch ran alone. The list is
    shared by all wrappers of a model, so the caller can swap its contents between groups of batches.
    """

    def __init__(self, conv: nn.Conv2d, generators: list[torch.Generator], pad: int = 1) -> None:
        super().__init__()
        self.conv = conv
        self.generators = generators
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        # Offsets come from CPU generators: reproducible and no device sync.
        offsets = [tuple(torch.randint(0, 2 * self.pad + 1, (2,), generator=g).tolist()) for g in self.generators]
        if len(offsets) == 1:
            return self.conv(swing_shift(x, offsets[0], self.pad))
        h, w, p = x.shape[-2], x.shape[-1], self.pad
        padded = F.pad(x, (p, p, p, p), mode="reflect").unflatten(0, (len(offsets), -1))
        crops = [padded[g, ..., dy:dy + h, dx:dx + w] for g, (dy, dx) in enumerate(offsets)]
        return self.conv(torch.cat(crops))


def _is_strided_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1)


def _wrap(module: nn.Module, generators: list[torch.Generator]) -> None:
    for name, child in module.named_children():
        if _is_strided_conv(child):
            setattr(module, name, SwingConv2d(child, generators))
        else:
            _wrap(child, generators)


def swing_model(model: nn.Module, generator: torch.Generator | list[torch.Generator] | None = None) -> nn.Module:
    """Deep copy of `model` with every Conv2d of stride > 1 wrapped in SwingConv2d.

    All wrappers share `generator` (a CPU torch.Generator; reseed it to replay the offsets) or a list of
    them, one per batch slice of the input (the list object is shared: change its contents in place).
    """
    out = copy.deepcopy(model)
    if generator is None:
        generator = torch.Generator()
    _wrap(out, generator if isinstance(generator, list) else [generator])
    return out
