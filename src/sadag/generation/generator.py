"""Genie's image generator (one per batch, always in train mode)."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError


class GenieGenerator(nn.Module):
    """z -> Linear -> (128, S/4, S/4) -> BN -> up x2 -> conv -> BN -> LeakyReLU -> up x2 -> conv -> Tanh -> BN.

    The last BN has no affine part, so the output has zero mean and unit variance per channel over
    the batch: it lands directly in the model's normalized input space.
    """

    def __init__(self, image_size: int, latent_dim: int = 256, c1: int = 128, c2: int = 64) -> None:
        super().__init__()
        if image_size % 4 != 0 or image_size < 4:
            raise ConfigError(f"the Genie generator needs an input size divisible by 4, got {image_size}")
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
        return self.body(out)
