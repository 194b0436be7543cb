"""Genie's image generator (one per batch, always in train mode), and G of them run as one module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_genie_input_size

# benchmarks/throughput.py turns this off to time the plain layout in the same run
CHANNELS_LAST_ON_CPU = True


class GenieGenerator(nn.Module):
    """z -> Linear -> (128, S/4, S/4) -> BN -> up x2 -> conv -> BN -> LeakyReLU -> up x2 -> conv -> Tanh -> BN.

    The last BN has no affine part, so the output has zero mean and unit variance per channel over
    the batch: it lands directly in the model's normalized input space.
    """

    def __init__(self, image_size: int, latent_dim: int = 256, c1: int = 128, c2: int = 64) -> None:
        super().__init__()
        check_genie_input_size(image_size)
        self.init_size = image_size // 4
        self.latent_dim = latent_dim
        self.linear = nn.Linear(latent_dim, c1 * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(c1),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c2, 3, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(3, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.linear(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.body(_layout(out))


def _layout(h: Tensor) -> Tensor:
    """channels_last on CPU: oneDNN's NCHW kernels are slow here (upsampling copies, weight gradients of the
    3-channel conv); it made the generator's forward and backward 1.7x faster, and the model fed its images
    about 1.1x (2 cores, batch 128). Same math, other float rounding. (The grouped forward of
    gen.parallel_batches > 1 stays NCHW: not measured in this layout.)"""
    if h.device.type == "cpu" and CHANNELS_LAST_ON_CPU:
        return h.contiguous(memory_format=torch.channels_last)
    return h


def _grouped_bn(mods: Sequence[nn.BatchNorm2d], h: Tensor) -> Tensor:
    """Train-mode BN of channel blocks (B, G*C, H, W): each generator's own batch statistics and affine
    part; the updated running statistics are written back to each generator (as its own forward would)."""
    first = mods[0]
    running_mean = torch.cat([m.running_mean for m in mods])
    running_var = torch.cat([m.running_var for m in mods])
    weight = torch.cat([m.weight for m in mods]) if first.affine else None
    bias = torch.cat([m.bias for m in mods]) if first.affine else None
    out = F.batch_norm(h, running_mean, running_var, weight, bias, True, first.momentum, first.eps)
    with torch.no_grad():
        for m, mean, var in zip(mods, running_mean.chunk(len(mods)), running_var.chunk(len(mods)), strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.add_(1)
    return out


def grouped_forward(gens: Sequence[GenieGenerator], z: Tensor) -> Tensor:
    """The images of G generators in one pass: z (G, B, latent) -> (G*B, 3, S, S), batch g first from z[g].

    The same math as concatenating gens[g](z[g]): the Linear layers become one batched matmul and the
    convolutions one grouped convolution over channel blocks (B, G*C, H, W), where a train-mode BatchNorm
    normalizes each batch's channels with that batch's statistics. Every generator must be in train mode.
    """
    if len(gens) == 1:
        return gens[0](z[0])
    first, groups, size = gens[0], z.shape[0], z.shape[1]
    weight = torch.stack([g.linear.weight for g in gens])
    bias = torch.stack([g.linear.bias for g in gens]).unsqueeze(1)
    h = torch.baddbmm(bias, z, weight.transpose(1, 2))  # (G, B, C1 * s * s)
    h = h.transpose(0, 1).reshape(size, -1, first.init_size, first.init_size)
    for i, layer in enumerate(first.body):
        mods = [g.body[i] for g in gens]
        if isinstance(layer, nn.BatchNorm2d):
            h = _grouped_bn(mods, h)
        elif isinstance(layer, nn.Conv2d):
            w = torch.cat([m.weight for m in mods])
            b = torch.cat([m.bias for m in mods]) if layer.bias is not None else None
            h = F.conv2d(h, w, b, layer.stride, layer.padding, layer.dilation, groups=groups)
        else:  # upsampling and activations act per channel
            h = layer(h)
    return h.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 1)
