"""Saving and loading synthetic calibration sets."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from ..models.spec import DataSpec
from ..rundir import atomic_write

IMAGES_FILE = "images.pt"
GRID_FILE = "grid.png"


def image_grid(images: Tensor, spec: DataSpec, max_images: int = 64, pad: int = 2) -> Image.Image:
    """A square-ish RGB grid of the first `max_images` images, denormalized and clamped to [0, 1]."""
    x = images[:max_images].detach().float().cpu()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = (x * std + mean).clamp(0.0, 1.0)
    n, _, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, top:top + h, left:left + w] = x[i]
    pixels = (canvas.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def save_synthetic_set(directory: str | os.PathLike, images: Tensor, spec: DataSpec, meta: dict) -> None:
    """DIR/images.pt = {"images": (N,3,S,S) float32 CPU normalized, "spec": ..., "meta": ...} and DIR/grid.png."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"synthetic images must have shape (N, 3, S, S), got {tuple(images.shape)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"images": images.detach().float().cpu().contiguous(), "spec": spec.to_dict(), "meta": dict(meta)}
    atomic_write(out / IMAGES_FILE, lambda p: torch.save(payload, p))
    grid = image_grid(payload["images"], spec)
    atomic_write(out / GRID_FILE, lambda p: grid.save(p, format="PNG"))


def load_synthetic_set(directory: str | os.PathLike) -> tuple[Tensor, dict]:
    """Return (images, {"spec": DataSpec, "meta": dict}) from a folder written by save_synthetic_set."""
    path = Path(directory) / IMAGES_FILE
    if not path.is_file():
        raise DataError(f"no synthetic set at {path}: expected a folder written by `sadag generate` (images.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        images, spec, meta = payload["images"], DataSpec.from_dict(payload["spec"]), payload["meta"]
    except Exception as exc:  # corrupt or foreign file: say which and what to do
        raise DataError(f"{path} is not a readable synthetic set ({exc}); regenerate it") from exc
    return images, {"spec": spec, "meta": meta}
