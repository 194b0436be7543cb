"""CIFAR-10/100 in the original python pickle format, with verified download."""

from __future__ import annotations

import logging
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..files import fetch, file_digest
from ..models.spec import DataSpec
from .transforms import preprocess

log = logging.getLogger(__name__)

# variant -> (url, md5 of the archive, folder inside it, test file, train files, label key)
CIFAR_SOURCES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py", ["test_batch"], [f"data_batch_{i}" for i in range(1, 6)], "labels"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python", ["test"], ["train"], "fine_labels"),
}


def _source(variant: str) -> tuple:
    if variant not in CIFAR_SOURCES:
        raise DataError(f"unknown CIFAR variant {variant!r}; use one of {sorted(CIFAR_SOURCES)}")
    return CIFAR_SOURCES[variant]


def _missing(folder: Path, names: list[str]) -> list[str]:
    return [name for name in names if not (folder / name).is_file()]


def download_cifar(root: str | Path, variant: str = "cifar10") -> Path:
    """Download, md5-check and extract the archive under ``root``; return the extracted folder.

    A folder that lacks any batch file (an extraction cut short) is extracted again.
    """
    url, md5, folder, test_files, train_files, _ = _source(variant)
    root = Path(root)
    if not _missing(root / folder, test_files + train_files):
        return root / folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[1]
    if not archive.is_file() or file_digest(archive, "md5") != md5:
        fetch(url, archive, DataError, f"download it by hand and extract it under {root}")
    if (found := file_digest(archive, "md5")) != md5:
        raise DataError(f"{archive} has md5 {found}, expected {md5}: delete it and download again")
    _extract(archive, root, folder, test_files + train_files)
    return root / folder


def _extract(archive: Path, root: Path, folder: str, names: list[str]) -> None:
    """Extract into a temporary folder under ``root``, then rename ``folder`` into place: a cut-short extraction
    never leaves a folder that looks complete. An incomplete ``folder`` already there is replaced."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".tmp", dir=root))
    try:
        with tarfile.open(archive) as tar:
            # The "data" filter refuses absolute paths and links out of root (Python >= 3.10.12 / 3.11.4).
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **kwargs)
        if missing := _missing(tmp / folder, names):
            raise DataError(f"{archive} has no {folder}/{missing[0]}: it is not the CIFAR archive; delete it and "
                            "download again")
        if (root / folder).exists():
            (root / folder).rename(tmp / "incomplete")
        (tmp / folder).rename(root / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The only classes a CIFAR batch pickle needs: numpy arrays (how numpy pickles them) and their dtypes.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other class is refused, not imported."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only arrays and "
                                         "lists, and unpickling other objects can run code")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle -> (uint8 images N x 32 x 32 x 3, int64 labels), read without running code from the file."""
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"cannot read CIFAR batch {path}: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR batch: it holds a {type(d).__name__}, not a dict")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} is not a CIFAR batch: expected keys 'data' and {label_key!r}, got {list(d)}")
    data, labels = np.asarray(d["data"]), np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} is not a CIFAR batch: 'data' must be uint8 rows of 3072 pixels, got "
                        f"{data.dtype} of shape {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path} is not a CIFAR batch: {len(data)} images but {label_key!r} holds "
                        f"{labels.dtype} of shape {labels.shape}; expected one integer label per image")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


class CifarDataset(Dataset):
    """The CIFAR test (or train) split as normalized tensors of ``spec.input_size`` pixels.

    ``root`` holds ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or is that folder itself). The 32x32 images
    go through the same resize and centre crop as ImageFolderDataset's (untouched when the model takes 32x32).
    """

    def __init__(self, root: str | Path, spec: DataSpec, variant: str = "cifar10", train: bool = False,
                 download: bool = False) -> None:
        _, _, folder, test_files, train_files, label_key = _source(variant)
        names = train_files if train else test_files
        base = self._locate(Path(root), folder, variant, names, download)
        batches = [read_cifar_batch(base / name, label_key) for name in names]
        self.pixels = np.concatenate([b[0] for b in batches])  # uint8 N x 32 x 32 x 3
        self.labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < spec.num_classes:
            raise DataError(f"{base} has labels {int(self.labels.min())}..{int(self.labels.max())}, the model has "
                            f"{spec.num_classes} classes: is it {variant} data for a {variant} model?")
        self.spec = spec

    @staticmethod
    def _locate(root: Path, folder: str, variant: str, names: list[str], download: bool) -> Path:
        for cand in (root / folder, root):
            if cand.is_dir() and cand.name == folder:
                if not (missing := _missing(cand, names)):
                    return cand
                if download:
                    return download_cifar(cand.parent, variant)
                raise DataError(f"{cand} lacks {', '.join(missing)} (an extraction cut short?): pass download=True "
                                f"or extract {_source(variant)[0]} under {cand.parent} again")
        if download:
            return download_cifar(root, variant)
        raise DataError(f"{root / folder} not found: pass download=True or extract {_source(variant)[0]} under {root}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return preprocess(Image.fromarray(self.pixels[i]), self.spec), int(self.labels[i])
