"""``root/<class>/<image>`` datasets (ImageFolder layout) without torchvision."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..models.spec import DataSpec
from .transforms import load_and_preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def check_folder(path: Path, what: str) -> None:
    """A clear error for a folder that is absent or is a file."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is a file, not a folder: give the folder that holds the images")


def read_class_index(path: str | Path) -> list[str]:
    """One class name per line; a class's label is its (0-based) line number. Blank lines after the last name
    are ignored; a blank line before it or a name given twice would shift or merge labels, and is refused."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"class index file {p} {'is a folder' if p.is_dir() else 'does not exist'}: give a text "
                        "file of class names, one per line in label order")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"class index file {p} is not a text file ({exc.reason} at byte {exc.start}): give a text "
                        "file of class names, one per line in label order") from exc
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        raise DataError(f"class index file {p} has a blank line at line {lines.index('') + 1}: every line before "
                        "the last name is a label, so remove it")
    first: dict[str, int] = {}
    for number, name in enumerate(lines, 1):
        if name in first:
            raise DataError(f"class index file {p} lists {name!r} twice (lines {first[name]} and {number}): each "
                            "class name must appear once")
        first[name] = number
    return lines


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``, returned as (normalized tensor, label).

    Labels follow the sorted class folders, or the line numbers of ``class_index`` when given
    (e.g. ImageNet's wnids.txt, so a 10-class subset keeps its 1000-way labels).
    ``limit`` keeps at most that many images per class (the first in sorted file order).

    ``labelled=True`` (evaluation) refuses labels that cannot be the model's: without a class index
    the folders must be exactly ``spec.num_classes`` (a subset of classes, or more folders than
    classes, has no label order to follow), and a class index may list at most that many names.
    ``labelled=False`` (calibration, which ignores labels) reads any folder: its class folders and the images
    directly under the root (a flat folder of images), labelled by their folder's position.
    """

    def __init__(self, root: str | Path, spec: DataSpec, class_index: str | Path | None = None,
                 limit: int | None = None, *, labelled: bool = True) -> None:
        self.root = Path(root)
        self.spec = spec
        folders = self._class_folders(labelled)
        self.classes = [f.name for f in folders]
        if labelled:
            names = read_class_index(class_index) if class_index is not None else None
            self._check_label_space(names, class_index)
            self.class_to_idx = self._labels(self.classes, names, class_index)
        else:  # calibration reads no labels: folders by position
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [
            (img, self.class_to_idx[f.name]) for f in folders for img in _images_in(f)[:limit]
        ]

    def digest(self) -> str:
        """The first 16 hex digits of the sha-256 of every sample's path (relative to the root), size and label:
        a cheap fingerprint of the folder (no image is read)."""
        digest = hashlib.sha256()
        for path, label in self.samples:
            digest.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\0{label}\n".encode())
        return digest.hexdigest()[:16]

    def _class_folders(self, labelled: bool) -> list[Path]:
        check_folder(self.root, "image folder")
        folders = sorted(d for d in self.root.iterdir() if d.is_dir() and _images_in(d))
        if not labelled and _images_in(self.root):
            folders.insert(0, self.root)
        if not folders:
            flat = "" if labelled else f" or {self.root}/<image>.jpg"
            raise DataError(f"no images found under {self.root}: expected {self.root}/<class>/<image>.jpg{flat} "
                            f"(one sub-folder per class, extensions {', '.join(IMAGE_EXTENSIONS)})")
        return folders

    def _check_label_space(self, names: list[str] | None, class_index: str | Path | None) -> None:
        """Folder order or the class index must give labels of this model, or accuracy is silently wrong."""
        want, have = self.spec.num_classes, len(self.classes)
        if names is not None:
            listed = len(names)
            if listed > want:
                raise DataError(f"class index {class_index} lists {listed} class names but the model has {want} "
                                f"classes: it belongs to another model; give the model's own class list")
            return
        if have != want:
            raise DataError(
                f"{self.root} has {have} class folders but the model has {want} classes, so labelling the sorted "
                f"folders 0..{have - 1} would not give the model's labels: pass --class-index FILE "
                f"(class_index= in Python) listing the model's {want} class names in label order, one per "
                f"line, with every folder name among them"
            )

    @staticmethod
    def _labels(classes: list[str], names: list[str] | None, class_index: str | Path | None) -> dict[str, int]:
        if names is None:
            return {c: i for i, c in enumerate(classes)}
        index = {c: i for i, c in enumerate(names)}
        absent = [c for c in classes if c not in index]
        if absent:
            raise DataError(f"class folders {absent[:10]} ({len(absent)} in all) are not listed in "
                            f"{class_index}; folder names must be lines of that file")
        return {c: index[c] for c in classes}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return load_and_preprocess(path, self.spec), label


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = False) -> DataLoader:
    """A plain DataLoader; in-process loading by default (the images are small)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)
