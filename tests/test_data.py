"""Data loading: image folders, class indices, CIFAR pickles, calibration sampling, transforms."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGENET_VAL, needs_imagenet, write_image_folder
from sadag.data import (
    CifarDataset,
    ImageFolderDataset,
    cifar,
    denormalize,
    download_cifar,
    load_and_preprocess,
    load_calibration_data,
    load_image,
    load_image_tensor,
    make_loader,
    normalize,
    preprocess,
    resize_and_crop,
    sample_calibration_images,
)
from sadag.errors import DataError
from sadag.models import DataSpec

VAL500 = IMAGENET_VAL
SPEC32 = DataSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), input_size=32, num_classes=3)
SPEC4 = DataSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), input_size=32, num_classes=4)
SPEC10 = DataSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), input_size=32, num_classes=10)
SPEC224 = DataSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=224, num_classes=1000,
                   resize=256)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_image_folder(tmp_path / "imgs", {"cat": 4, "ant": 3, "dog": 5})
    return tmp_path / "imgs"


def test_folder_labels_follow_sorted_classes(folder: Path) -> None:
    ds = ImageFolderDataset(folder, SPEC32)
    assert ds.classes == ["ant", "cat", "dog"] and len(ds) == 12
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0 and ds[11][1] == 2
    assert len(ImageFolderDataset(folder, SPEC32, limit=2)) == 6
    xb, yb = next(iter(make_loader(ds, batch_size=5)))
    assert xb.shape == (5, 3, 32, 32) and yb.tolist() == [0, 0, 0, 1, 1]


def test_folder_with_class_index(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "index.txt").write_text("zebra\ndog\nant\ncat\n")
    ds = ImageFolderDataset(folder, SPEC4, class_index=tmp_path / "index.txt")
    assert ds.class_to_idx == {"ant": 2, "cat": 3, "dog": 1}
    (tmp_path / "short.txt").write_text("ant\n")
    with pytest.raises(DataError, match=r"\['cat', 'dog'\].*not listed"):
        ImageFolderDataset(folder, SPEC32, class_index=tmp_path / "short.txt")


@needs_imagenet
def test_imagenet_val500_class_index() -> None:
    wnids = (VAL500 / "wnids.txt").read_text().split()
    ds = ImageFolderDataset(VAL500 / "val", SPEC224, class_index=VAL500 / "wnids.txt", limit=1)
    assert ds.class_to_idx["n01440764"] == 0
    assert ds.class_to_idx["n03888257"] == wnids.index("n03888257") == 701  # parachute
    x, y = ds[ds.classes.index("n03888257")]
    assert y == 701 and x.shape == (3, 224, 224)


def test_empty_folder_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found under .*empty: expected"):
        ImageFolderDataset(tmp_path / "empty", SPEC32)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "absent", SPEC32)


def test_unreadable_image_names_the_file(folder: Path) -> None:
    (folder / "ant" / "000.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(folder, SPEC32)
    with pytest.raises(DataError, match=r"cannot read image .*ant.000\.png"):
        ds[0]


def test_seeded_sampling(folder: Path) -> None:
    a = sample_calibration_images(folder, SPEC32, 6, seed=1)
    b = sample_calibration_images(folder, SPEC32, 6, seed=1)
    c = sample_calibration_images(folder, SPEC32, 6, seed=2)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    all_imgs = sample_calibration_images(folder, SPEC32, 12, seed=0)
    # Without replacement: every image appears exactly once.
    assert len({tuple(img.flatten()[:16].tolist()) for img in all_imgs}) == 12
    with pytest.raises(DataError, match="only 12"):
        sample_calibration_images(folder, SPEC32, 13, seed=0)


def test_saved_sets_and_dispatch(folder: Path, tmp_path: Path) -> None:
    imgs = torch.randn(8, 3, 32, 32)
    (tmp_path / "synth").mkdir()
    torch.save({"images": imgs, "labels": torch.arange(8)}, tmp_path / "synth" / "images.pt")
    torch.save(imgs, tmp_path / "raw.pt")
    assert torch.equal(load_image_tensor(tmp_path / "synth"), imgs)
    assert torch.equal(load_calibration_data(tmp_path / "raw.pt", SPEC32, num=3), imgs[:3])
    assert torch.equal(load_calibration_data(tmp_path / "synth", SPEC32), imgs)
    real = load_calibration_data(folder, SPEC32, num=4, seed=3)
    assert torch.equal(real, sample_calibration_images(folder, SPEC32, 4, seed=3))
    with pytest.raises(DataError, match="model expects 224x224"):
        load_calibration_data(tmp_path / "raw.pt", SPEC224)
    torch.save({"x": imgs}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        load_image_tensor(tmp_path / "bad.pt")


def _fake_cifar(root: Path, folder: str, file: str, label_key: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    (root / folder).mkdir(parents=True, exist_ok=True)
    with open(root / folder / file, "wb") as f:
        pickle.dump({b"data": data, label_key.encode(): list(range(n)), b"batch_label": b"test"}, f)
    return data


@pytest.mark.parametrize(("variant", "folder", "file", "key"), [
    ("cifar10", "cifar-10-batches-py", "test_batch", "labels"),
    ("cifar100", "cifar-100-python", "test", "fine_labels"),
])
def test_cifar_pickle(tmp_path: Path, variant: str, folder: str, file: str, key: str) -> None:
    data = _fake_cifar(tmp_path, folder, file, key, 5)
    ds = CifarDataset(tmp_path, SPEC10, variant=variant)
    assert len(ds) == 5 and ds[3][1] == 3
    x, _ = ds[2]
    # Channel-major rows: the first 1024 bytes are the red plane in row order.
    expected_red = torch.from_numpy(data[2, :1024].reshape(32, 32)).float() / 255
    assert torch.allclose(denormalize(x[None], SPEC10)[0, 0], expected_red, atol=1e-5)
    assert len(CifarDataset(tmp_path / folder, SPEC10, variant=variant)) == 5
    with pytest.raises(DataError, match="labels 0..4, the model has 3 classes"):  # CIFAR-100 data, CIFAR-10 model
        CifarDataset(tmp_path, SPEC32, variant=variant)


@pytest.mark.parametrize("resize", [None, 73])
def test_cifar_is_resized_to_the_model_input_like_an_image_folder(tmp_path: Path, resize: int | None) -> None:
    data = _fake_cifar(tmp_path, "cifar-10-batches-py", "test_batch", "labels", 3)
    spec = DataSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), input_size=64, num_classes=10, resize=resize)
    Image.fromarray(data[1].reshape(3, 32, 32).transpose(1, 2, 0)).save(tmp_path / "one.png")  # lossless
    x, _ = CifarDataset(tmp_path, spec)[1]
    assert x.shape == (3, 64, 64) and torch.equal(x, load_and_preprocess(tmp_path / "one.png", spec))


def _cifar_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local stand-in for the CIFAR-10 archive (3 images per batch), served through a file:// URL."""
    url, _, folder, test_files, train_files, key = cifar.CIFAR_SOURCES["cifar10"]
    for name in test_files + train_files:
        _fake_cifar(tmp_path / "src", folder, name, key, 3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / folder, arcname=folder)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(cifar.CIFAR_SOURCES, "cifar10",
                        (archive.as_uri(), md5, folder, test_files, train_files, key))
    return tmp_path / "data" / folder


def test_a_half_extracted_cifar_folder_is_extracted_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _cifar_archive(tmp_path, monkeypatch)
    _fake_cifar(folder.parent, folder.name, "test_batch", "labels", 3)  # the test split only: train files missing
    with pytest.raises(DataError, match="lacks data_batch_1, .*data_batch_5 .*download=True"):
        CifarDataset(folder.parent, SPEC10, train=True)
    assert len(CifarDataset(folder.parent, SPEC10, train=True, download=True)) == 15
    assert sorted(p.name for p in folder.parent.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    (folder / "data_batch_3").unlink()
    assert download_cifar(folder.parent) == folder and (folder / "data_batch_3").is_file()


@pytest.mark.parametrize(("data", "labels", "match"), [
    (np.zeros((10, 3072), np.uint8), list(range(3)), r"10 images but 'labels' holds int64 of shape \(3,\)"),
    (np.zeros((10, 3072), np.float32), list(range(10)), "must be uint8 rows of 3072 pixels, got float32"),
    (np.zeros((10, 3000), np.uint8), list(range(10)), r"got uint8 of shape \(10, 3000\)"),
    (np.zeros((2, 3072), np.uint8), ["cat", "dog"], "expected one integer label per image"),
])
def test_malformed_cifar_batches_are_refused(tmp_path: Path, data, labels, match: str) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    with pytest.raises(DataError, match=match):
        CifarDataset(tmp_path, SPEC10)


def test_a_very_elongated_image_is_refused_before_resizing(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(tmp_path / "strip.png")  # 256 x 768,000 once resized
    with pytest.raises(DataError, match="too elongated"):
        load_and_preprocess(tmp_path / "strip.png", SPEC224)


def test_cifar_missing_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download=True") as info:
        CifarDataset(tmp_path, SPEC32)
    assert "--download" not in str(info.value)  # no such flag
    with pytest.raises(DataError, match="unknown CIFAR variant"):
        CifarDataset(tmp_path, SPEC32, variant="cifar1000")


def test_transforms_normalization_roundtrip() -> None:
    img = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    x = preprocess(img, SPEC32)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.5, 2.4, 1.4]))
    batch = torch.rand(2, 3, 8, 8)
    assert torch.allclose(denormalize(normalize(batch, SPEC32), SPEC32), batch, atol=1e-6)


def test_resize_rules() -> None:
    exact = Image.new("RGB", (224, 224))
    assert resize_and_crop(exact, SPEC224) is exact  # already input size: untouched
    assert resize_and_crop(Image.new("RGB", (500, 375)), SPEC224).size == (224, 224)
    big = Image.fromarray(np.zeros((64, 48, 3), dtype=np.uint8))
    assert resize_and_crop(big, SPEC32).size == (32, 32)  # resize=None: straight to input size


def _gradient(high: int) -> np.ndarray:
    """A 32x32 ramp from 0 to ``high`` (row-major), so every gray level shows up."""
    return np.linspace(0, high, 32 * 32).reshape(32, 32)


@pytest.mark.parametrize(("mode", "suffix", "values"), [
    ("I;16", ".png", _gradient(65535).astype(np.uint16)),  # 16-bit PNG
    ("I;16", ".tif", _gradient(65535).astype(np.uint16)),  # 16-bit TIFF
    ("I", ".tif", _gradient(65535).astype(np.int32)),  # 32-bit integer TIFF holding 16-bit samples
    ("F", ".tif", _gradient(1.0).astype(np.float32)),  # float TIFF in [0, 1]
    ("F", ".tif", _gradient(255.0).astype(np.float32)),  # float TIFF in [0, 255]
])
def test_high_bit_depth_images_keep_their_gray_levels(tmp_path: Path, mode: str, suffix: str,
                                                      values: np.ndarray) -> None:
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == mode
    rgb = np.asarray(load_image(path))
    expected = np.round(np.linspace(0, 255, 32 * 32)).reshape(32, 32)
    assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 1] - expected).max() <= 1
    assert torch.allclose(preprocess(Image.open(path), SPEC32), load_and_preprocess(path, SPEC32))


@pytest.mark.parametrize(("values", "match"), [
    (_gradient(1000.0).astype(np.float32), "outside \\[0, 1\\] and \\[0, 255\\]"),
    (_gradient(1.0).astype(np.float32) - 0.5, "outside \\[0, 1\\] and \\[0, 255\\]"),
    (np.full((32, 32), np.nan, dtype=np.float32), "NaN"),
    (_gradient(100_000).astype(np.int32), "outside the 16-bit range"),
])
def test_images_of_unknown_range_are_refused_by_name(tmp_path: Path, values: np.ndarray, match: str) -> None:
    path = tmp_path / "cls" / "odd.tif"
    path.parent.mkdir()
    Image.fromarray(values).save(path)
    with pytest.raises(DataError, match=f"odd\\.tif.*{match}"):
        load_image(path)


@pytest.mark.parametrize("folders", [2, 5])
def test_class_folders_that_do_not_fit_the_model_are_refused(tmp_path: Path, folders: int) -> None:
    names = ["ant", "bee", "cat", "dog", "eel"][:folders]
    write_image_folder(tmp_path / "imgs", dict.fromkeys(names, 1))
    with pytest.raises(DataError, match=f"has {folders} class folders but the model has 3 classes.*--class-index"):
        ImageFolderDataset(tmp_path / "imgs", SPEC32)
    (tmp_path / "index.txt").write_text("\n".join(["eel", "ant", "bee", "cat", "dog"][:max(folders, 3)]))
    if folders <= 3:  # a subset of the classes, mapped by the index: labels are the index's
        ds = ImageFolderDataset(tmp_path / "imgs", SPEC32, class_index=tmp_path / "index.txt")
        assert ds.class_to_idx == {"ant": 1, "bee": 2}
    else:  # an index with more names than the model has classes belongs to another model
        with pytest.raises(DataError, match="lists 5 class names but the model has 3 classes"):
            ImageFolderDataset(tmp_path / "imgs", SPEC32, class_index=tmp_path / "index.txt")
    # Calibration ignores labels: any folder is fine there.
    assert len(ImageFolderDataset(tmp_path / "imgs", SPEC32, labelled=False)) == folders
    assert sample_calibration_images(tmp_path / "imgs", SPEC32, folders, seed=0).shape[0] == folders
    assert load_calibration_data(tmp_path / "imgs", SPEC32).shape[0] == folders


def test_cifar_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="refused to load builtins.exec"):
        CifarDataset(tmp_path, SPEC32)
    assert not marker.exists()


def test_a_flat_folder_calibrates_but_does_not_evaluate(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "nested", {"x": 5})
    flat = tmp_path / "nested" / "x"  # five images, no class folders
    assert sample_calibration_images(flat, SPEC32, 5, seed=0).shape == (5, 3, 32, 32)
    with pytest.raises(DataError, match="no images found under .*expected .*<class>/<image>.jpg \\("):
        ImageFolderDataset(flat, SPEC32)
    with pytest.raises(DataError, match="is a file, not a folder"):
        ImageFolderDataset(next(flat.iterdir()), SPEC32, labelled=False)


@pytest.mark.parametrize(("text", "match"), [
    ("ant\ncat\ndog\nant\n", "lists 'ant' twice \\(lines 1 and 4\\)"),  # the last line would win: ant -> 3
    ("ant\n\ncat\ndog\n", "blank line at line 2"),  # every later label would be off by one
    (b"\x80\x81\xfe binary", "is not a text file"),
])
def test_class_index_files_that_would_mislabel_are_refused(folder: Path, tmp_path: Path, text, match) -> None:
    index = tmp_path / "index.txt"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=match):
        ImageFolderDataset(folder, SPEC4, class_index=index)
    index.write_text("ant\ncat\ndog\n\n\n")  # trailing blank lines are fine
    assert ImageFolderDataset(folder, SPEC4, class_index=index).class_to_idx == {"ant": 0, "cat": 1, "dog": 2}


def test_a_saved_set_of_another_normalization_is_refused(tmp_path: Path) -> None:
    from sadag.generation import save_synthetic_set

    images = torch.randn(4, 3, 32, 32)
    save_synthetic_set(tmp_path / "set", images, SPEC32, {"model": "other"})
    assert torch.equal(load_calibration_data(tmp_path / "set", SPEC4), images)  # same normalization, more classes
    cifar = DataSpec(mean=(0.49, 0.48, 0.45), std=(0.2, 0.2, 0.2), input_size=32, num_classes=3)
    with pytest.raises(DataError, match="made for 'other'.* normalized with mean .*generate a set for this model"):
        load_calibration_data(tmp_path / "set", cifar)
