"""Calibration sets: a seeded sample of real images, or a saved set (read by sadag.generation.io)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..generation.io import load_synthetic_set, saved_set_file
from ..models.spec import DataSpec
from .folder import ImageFolderDataset


def sample_calibration_images(root: str | Path, spec: DataSpec, num: int, seed: int) -> torch.Tensor:
    """``num`` images drawn uniformly without replacement (seeded) from an image folder (its class folders and
    the images directly under it), normalized."""
    dataset = ImageFolderDataset(root, spec, labelled=False)
    if num > len(dataset):
        raise DataError(f"asked for {num} calibration images but {root} holds only {len(dataset)}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)[:num].tolist()
    return torch.stack([dataset[i][0] for i in order])


def load_image_tensor(path: str | Path) -> torch.Tensor:
    """The images of a saved set: ``images.pt`` in a directory, or a .pt file holding {"images": T} or T."""
    return load_synthetic_set(path)[0]


def calibration_set(path: str | Path, spec: DataSpec, num: int | None,
                    seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """(images, the set's meta) from a saved set (its first ``num`` images, all if None) or a real image folder
    (a seeded sample of ``num``, all if None; meta {"method": "real"})."""
    p = Path(path)
    if saved_set_file(p) is None:
        count = num if num is not None else len(ImageFolderDataset(p, spec, labelled=False))
        return sample_calibration_images(p, spec, count, seed), {"method": "real"}
    images, info = load_synthetic_set(p)
    if images.shape[-1] != spec.input_size or images.shape[-2] != spec.input_size:
        raise DataError(f"images in {p} are {tuple(images.shape[-2:])}, the model expects "
                        f"{spec.input_size}x{spec.input_size}: were they generated for another model?")
    _check_normalization(p, info, spec)
    if num is not None and num > images.shape[0]:
        raise DataError(f"asked for {num} calibration images but the set {p} holds only {images.shape[0]}")
    return (images[:num] if num is not None else images), {"method": "saved", **info["meta"]}


def _check_normalization(path: Path, info: dict[str, Any], spec: DataSpec) -> None:
    """A saved set holds normalized images: another model's mean and std would shift every pixel silently."""
    saved = info["spec"]
    if saved is None or (tuple(saved.mean), tuple(saved.std)) == (tuple(spec.mean), tuple(spec.std)):
        return
    made_for = f" (made for {info['meta']['model']!r})" if info["meta"].get("model") else ""
    raise DataError(f"the set {path}{made_for} is normalized with mean {saved.mean}, std {saved.std}; this model "
                    f"expects mean {spec.mean}, std {spec.std}: generate a set for this model (`sadag generate`)")


def load_calibration_data(path: str | Path, spec: DataSpec, num: int | None = None, seed: int = 0) -> torch.Tensor:
    """Saved set (dir with images.pt, or .pt) -> its first ``num`` images; image folder -> seeded sample."""
    return calibration_set(path, spec, num, seed)[0]
