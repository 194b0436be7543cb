"""SynQ's Gaussian low-pass filter on synthetic images."""

from __future__ import annotations

import math

import pytest
import torch

from sadag.errors import ConfigError, DataError
from sadag.generation.lowpass import apply_lowpass
from sadag.models.spec import DataSpec

SPEC = DataSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=32, num_classes=10)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _synq_reference(images: torch.Tensor, d_zero: float) -> torch.Tensor:
    """The filter as SynQ writes it: centred full spectrum, Gaussian of the distance to the centre, real part."""
    height, width = images.shape[-2:]
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    h = torch.exp(-((x - width // 2) ** 2 + (y - height // 2) ** 2) / (2 * d_zero**2))
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.double()), dim=(-2, -1)) * h
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.float()


@pytest.mark.parametrize("d_zero", [4.0, 11.5, 80.0])
def test_matches_synq_construction(d_zero: float) -> None:
    x = _images()
    torch.testing.assert_close(apply_lowpass(x, SPEC, d_zero), _synq_reference(x, d_zero), atol=1e-5, rtol=1e-5)


def test_each_frequency_is_scaled_by_the_gaussian_and_the_mean_is_kept() -> None:
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    d_zero = 6.0
    for ky, kx in [(0, 3), (5, 0), (4, 9), (16, 16)]:
        wave = torch.cos(2 * math.pi * (ky * y + kx * x) / 32)
        image = (0.7 + wave).expand(1, 3, 32, 32)
        gain = math.exp(-(ky**2 + kx**2) / (2 * d_zero**2))
        torch.testing.assert_close(apply_lowpass(image, SPEC, d_zero), 0.7 + gain * wave.expand(1, 3, 32, 32),
                                   atol=1e-5, rtol=0)
    images = _images()
    torch.testing.assert_close(apply_lowpass(images, SPEC, 2.0).mean(dim=(2, 3)), images.mean(dim=(2, 3)),
                               atol=1e-5, rtol=0)


def test_removes_energy_above_the_cutoff() -> None:
    images, d_zero = _images(), 5.0
    power_in = torch.fft.fft2(images).abs().square()
    power_out = torch.fft.fft2(apply_lowpass(images, SPEC, d_zero)).abs().square()
    f = torch.fft.fftfreq(32, d=1 / 32)
    dist = (f[:, None].square() + f[None, :].square()).sqrt()
    high = dist > 2 * d_zero  # gain <= exp(-2): power <= exp(-4) ~ 2%
    assert power_out[..., high].sum() < 0.02 * power_in[..., high].sum()
    low = dist <= 1
    assert power_out[..., low].sum() > 0.95 * power_in[..., low].sum()


def test_zero_is_off_and_a_huge_cutoff_is_nearly_identity() -> None:
    images = _images()
    assert torch.equal(apply_lowpass(images, SPEC, 0.0), images)
    torch.testing.assert_close(apply_lowpass(images, SPEC, 1e6), images, atol=1e-5, rtol=0)


def test_commutes_with_normalization_and_stays_finite() -> None:
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(SPEC.mean)[:, None, None], torch.tensor(SPEC.std)[:, None, None]
    normalized_first = apply_lowpass((pixels - mean) / std, SPEC, 3.0)
    torch.testing.assert_close(normalized_first, (apply_lowpass(pixels, SPEC, 3.0) - mean) / std,
                               atol=1e-5, rtol=1e-5)
    assert torch.isfinite(normalized_first).all() and normalized_first.dtype == torch.float32


def test_bad_input_says_what_is_wrong() -> None:
    with pytest.raises(DataError, match=r"\(N, 3, 32, 32\)"):
        apply_lowpass(torch.zeros(2, 3, 16, 16), SPEC, 10.0)
    with pytest.raises(ConfigError, match="D0"):
        apply_lowpass(_images(), SPEC, -1.0)
    with pytest.raises(ConfigError, match="D0"):
        apply_lowpass(_images(), SPEC, float("nan"))
