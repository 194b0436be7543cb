"""The saved-set format, its only reader and writer: ``DIR/images.pt`` (and a preview ``DIR/grid.png``).

``images.pt`` = {"images": (N, 3, S, S) float32 normalized, "spec": DataSpec dict, "meta": dict, "artifacts":
dict}: tensors and plain containers only, read with ``weights_only=True``. ``artifacts`` carries what a later
method may continue from (a Genie set: each batch's generator state and latents). A bare ``.pt`` file holding
such a dict or just the images tensor is read too.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from ..models.spec import DataSpec
from ..rundir import atomic_write, check_plain

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


def save_synthetic_set(directory: str | os.PathLike, images: Tensor, spec: DataSpec, meta: dict,
                       artifacts: dict[str, Any] | None = None) -> None:
    """Write DIR/images.pt and DIR/grid.png atomically."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"synthetic images must have shape (N, 3, S, S), got {tuple(images.shape)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"images": images.detach().float().cpu().contiguous(), "spec": spec.to_dict(), "meta": dict(meta),
               "artifacts": dict(artifacts or {})}
    check_plain(payload, str(out / IMAGES_FILE))
    atomic_write(out / IMAGES_FILE, lambda p: torch.save(payload, p))
    grid = image_grid(payload["images"], spec)
    atomic_write(out / GRID_FILE, lambda p: grid.save(p, format="PNG"))


def images_digest(images: Tensor) -> str:
    """The first 16 hex digits of the sha-256 of the images' shape and float32 values: equal digests, the same
    images (which file or run they came from does not enter)."""
    values = images.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(values.shape)).encode())
    digest.update(values.numpy())
    return digest.hexdigest()[:16]


def saved_set_file(path: str | os.PathLike) -> Path | None:
    """The file of a saved set at ``path`` (a directory holding images.pt, or a .pt file), else None."""
    p = Path(path)
    if p.is_dir() and (p / IMAGES_FILE).is_file():
        return p / IMAGES_FILE
    if p.is_file() and p.suffix == ".pt":
        return p
    return None


def load_synthetic_set(path: str | os.PathLike) -> tuple[Tensor, dict[str, Any]]:
    """(images float32, {"spec": DataSpec or None, "meta": dict, "artifacts": dict}) of a saved set."""
    file = saved_set_file(path)
    if file is None:
        raise DataError(f"no saved set at {path}: expected a folder written by `sadag generate` ({IMAGES_FILE}) "
                        "or a .pt file")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which and what to do
        raise DataError(f"{file} is not a readable saved set ({exc}); regenerate it") from exc
    payload = payload if isinstance(payload, dict) else {"images": payload}
    images = payload.get("images")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"{file} must hold a (N, 3, H, W) tensor, or a dict with one under 'images'; regenerate it")
    try:
        spec = DataSpec.from_dict(payload["spec"]) if payload.get("spec") is not None else None
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{file}: its 'spec' is malformed ({exc}); regenerate it") from exc
    meta, artifacts = payload.get("meta") or {}, payload.get("artifacts") or {}
    if not isinstance(meta, dict) or not isinstance(artifacts, dict):
        raise DataError(f"{file}: 'meta' and 'artifacts' must be mappings; regenerate it")
    return images.float(), {"spec": spec, "meta": meta, "artifacts": artifacts}
