"""Image preprocessing with PIL and torch only (torchvision is optional for sadag)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..models.spec import DataSpec


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB (see :func:`to_rgb`); unreadable files raise DataError naming the file."""
    try:
        with Image.open(path) as img:
            return to_rgb(img, path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def to_rgb(img: Image.Image, source: str | Path = "image") -> Image.Image:
    """8-bit RGB, with single-channel images of more than 8 bits scaled by their range, not clipped.

    Pillow's own conversion clips every value above 255, so a 16-bit or float image would come out
    all white or all black. Instead:

    - ``I;16`` (16-bit PNG/TIFF) and ``I`` (32-bit integer, as Pillow opens some 16-bit files): the
      samples are 16-bit, 0..65535 maps to 0..255; an ``I`` image with values outside 0..65535 is
      refused, its range is unknown.
    - ``F`` (32-bit float): values in [0, 1] map to 0..255, otherwise values in [0, 255] are kept;
      negative, larger, NaN or infinite values are refused, their range is unknown.

    ``source`` names the image in the error (its path).
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode, source)).convert("RGB")
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str, source: str | Path) -> np.ndarray:
    values = arr.astype(np.float64)
    if mode.startswith("I"):
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"image {source} (mode {mode}) has values in [{values.min():g}, {values.max():g}], "
                            f"outside the 16-bit range 0..65535; convert it to 8-bit RGB")
        return np.round(values / 257.0).astype(np.uint8)  # 65535 / 255 = 257
    if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 255)):
        raise DataError(f"float image {source} has values outside [0, 1] and [0, 255] (or NaN/inf), so its "
                        f"brightness range is unknown; convert it to 8-bit RGB")
    scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    return np.round(values * scale).astype(np.uint8)


def resize_and_crop(img: Image.Image, spec: DataSpec) -> Image.Image:
    """Shorter side to ``spec.resize`` then centre crop (the torchvision eval recipe).

    Images that already are ``input_size`` square are returned untouched: datasets stored at the
    model's resolution (CIFAR, the 224x224 val500 copy) must not be upscaled and cropped.
    """
    size = spec.input_size
    if img.size == (size, size):
        return img
    if spec.resize is None:
        return img.resize((size, size), Image.BILINEAR)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(spec.resize * long / short)
    if Image.MAX_IMAGE_PIXELS and new_long * spec.resize > Image.MAX_IMAGE_PIXELS:  # a 1 x 30000 strip: gigabytes
        raise DataError(f"image of {w}x{h} pixels is too elongated: its shorter side resized to {spec.resize} "
                        f"makes {spec.resize}x{new_long} pixels; crop it closer to square")
    img = img.resize((spec.resize, new_long) if w <= h else (new_long, spec.resize), Image.BILINEAR)
    return center_crop(img, size)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:
        raise DataError(f"image of {w}x{h} pixels is smaller than the {size}x{size} crop; "
                        f"set DataSpec.resize >= {size}")
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float CHW tensor in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _stats(x: torch.Tensor, spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(shape)
    return mean, std


def normalize(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """[0, 1] images ((3,H,W) or (N,3,H,W)) -> model input."""
    mean, std = _stats(x, spec)
    return (x - mean) / std


def denormalize(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Model input -> [0, 1] image range (not clamped)."""
    mean, std = _stats(x, spec)
    return x * std + mean


def preprocess(img: Image.Image, spec: DataSpec) -> torch.Tensor:
    """PIL image -> normalized (3, input_size, input_size) tensor."""
    return normalize(to_tensor(resize_and_crop(to_rgb(img), spec)), spec)


def load_and_preprocess(path: str | Path, spec: DataSpec) -> torch.Tensor:
    return preprocess(load_image(path), spec)
