"""SynQ's low-pass filter on synthetic images (Kim, Kim and Kang, ICLR 2025, code snudm-starlab/SynQ).

SynQ multiplies each image's centred 2-D spectrum by a Gaussian H(u, v) = exp(-D(u, v)^2 / (2 D0^2)), D the
distance in frequency-index units (cycles per image) from the zero frequency, and keeps the real part of the
inverse transform (their Trainer.apply_filters). D0 is in the same units whatever the image size: the code's
default is 80 (224x224 ImageNet), and the paper searched D0 in {20, 40, 60, 80, 100}.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..models.spec import DataSpec


def gaussian_transfer(height: int, width: int, cutoff: float, device: torch.device | None = None) -> Tensor:
    """H on the rfft2 grid, shape (height, width // 2 + 1): exp(-(fy^2 + fx^2) / (2 cutoff^2)), f integer."""
    fy = torch.fft.fftfreq(height, d=1.0 / height, device=device)
    fx = torch.fft.rfftfreq(width, d=1.0 / width, device=device)
    d2 = fy[:, None].square() + fx[None, :].square()
    return torch.exp(-d2 / (2.0 * cutoff**2))


def apply_lowpass(images: Tensor, spec: DataSpec, cutoff: float) -> Tensor:
    """SynQ's Gaussian low-pass filter with D0 = ``cutoff`` on (N, 3, S, S) images; cutoff 0 returns them as is.

    The images are filtered as stored, normalized ((x - mean) / std per channel), which is where SynQ filters
    (its synthetic batches are model inputs). The space does not matter: the filter is linear, acts on each
    channel alone and passes the zero frequency with gain exactly 1, so it commutes with the per-channel
    affine normalization, and a channel's mean is kept. Returns float32 of the input's shape and device.
    """
    if not cutoff >= 0.0:  # also rejects NaN
        raise ConfigError(f"the low-pass cutoff (SynQ's D0) must be >= 0 (0 = off), got {cutoff}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (spec.input_size, spec.input_size):
        raise DataError(
            f"low-pass filtering expects images of shape (N, 3, {spec.input_size}, {spec.input_size}) for this "
            f"model, got {tuple(images.shape)}"
        )
    x = images.float()
    if cutoff == 0.0:
        return x.clone()
    height, width = x.shape[-2:]
    spectrum = torch.fft.rfft2(x) * gaussian_transfer(height, width, cutoff, x.device)
    return torch.fft.irfft2(spectrum, s=(height, width))
