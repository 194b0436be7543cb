"""Calibration sets: a seeded sample of real images, or a saved synthetic set."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from ..models.spec import DataSpec
from .folder import ImageFolderDataset

SAVED_SET_FILE = "images.pt"


def sample_calibration_images(root: str | Path, spec: DataSpec, num: int, seed: int,
                              class_index: str | Path | None = None) -> torch.Tensor:
    """``num`` images drawn uniformly without replacement (seeded) from an image folder, normalized."""
    dataset = ImageFolderDataset(root, spec, class_index=class_index, labelled=False)
    if num > len(dataset):
        raise DataError(f"asked for {num} calibration images but {root} holds only {len(dataset)}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)[:num].tolist()
    return torch.stack([dataset[i][0] for i in order])


def _saved_set_file(path: Path) -> Path | None:
    if path.is_dir() and (path / SAVED_SET_FILE).is_file():
        return path / SAVED_SET_FILE
    if path.is_file() and path.suffix == ".pt":
        return path
    return None


def load_image_tensor(path: str | Path) -> torch.Tensor:
    """A saved image set: ``images.pt`` in a directory (or a .pt file) holding {"images": T} or T."""
    p = Path(path)
    file = _saved_set_file(p)
    if file is None:
        raise DataError(f"{p} is neither a .pt file nor a directory containing {SAVED_SET_FILE}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any load failure means the file is not a usable image set
        raise DataError(f"{file} is not a readable torch file: {e}") from e
    images = obj.get("images") if isinstance(obj, dict) else obj
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"{file} must hold a (N, 3, H, W) tensor, or a dict with one under 'images'")
    return images.float()


def load_calibration_data(path: str | Path, spec: DataSpec, num: int | None = None, seed: int = 0,
                          class_index: str | Path | None = None) -> torch.Tensor:
    """Saved set (dir with images.pt, or .pt) -> its first ``num`` images; image folder -> seeded sample."""
    p = Path(path)
    if _saved_set_file(p) is not None:
        images = load_image_tensor(p)
        if images.shape[-1] != spec.input_size or images.shape[-2] != spec.input_size:
            raise DataError(f"images in {p} are {tuple(images.shape[-2:])}, the model expects "
                            f"{spec.input_size}x{spec.input_size}: were they generated for another model?")
        return images[:num] if num is not None else images
    if num is None:
        num = len(ImageFolderDataset(p, spec, class_index=class_index, labelled=False))
    return sample_calibration_images(p, spec, num, seed, class_index)


def saved_set_meta(path: str | Path) -> dict | None:
    """The metadata of a saved synthetic set (method, model, seed...), or None if ``path`` is not one."""
    file = _saved_set_file(Path(path))
    if file is None:
        return None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # same message as load_image_tensor would give
        raise DataError(f"{file} is not a readable torch file: {e}") from e
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return dict(meta) if isinstance(meta, dict) else {"method": "saved"}
