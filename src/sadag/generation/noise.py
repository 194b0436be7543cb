"""Gaussian-noise baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.spec import DataSpec


def generate_noise(spec: DataSpec, num: int, seed: int) -> Tensor:
    """(num, 3, S, S) float32 CPU samples of N(0, 1) in the model's normalized input space."""
    if num < 1:
        raise ConfigError(f"the number of noise images must be >= 1, got {num}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    s = spec.input_size
    return torch.randn(num, 3, s, s, generator=gen)
