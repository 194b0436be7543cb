"""Shared paths to the real data and weights, and small models for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from sadag import CalibConfig, DataSpec, QuantConfig, quantize, reconstruct_
from sadag.quantization.units import register_unit_type

SHARED = Path(os.environ.get("SADAG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
R20_WEIGHTS = SHARED / "weights" / "cifar10-resnet" / "resnet20-12fca82f.th"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg" / "test"
CIFAR_TRAIN = SHARED / "data" / "cifar10-jpeg" / "train-5k"
IMAGENET_VAL = SHARED / "data" / "imagenet-val500"

R56_WEIGHTS = SHARED / "weights" / "cifar10-resnet" / "resnet56-4bfd9763.th"

# The one marker per kind of shared file; tests needing them skip with the path to set.
needs_shared = pytest.mark.skipif(
    not (R20_WEIGHTS.is_file() and CIFAR_TEST.is_dir() and CIFAR_TRAIN.is_dir()),
    reason=f"ResNet-20 weights or CIFAR-10 images not found under {SHARED} (set SADAG_SHARED)",
)
needs_r56 = pytest.mark.skipif(not R56_WEIGHTS.is_file(), reason=f"{R56_WEIGHTS} not found (set SADAG_SHARED)")
needs_imagenet = pytest.mark.skipif(not IMAGENET_VAL.is_dir(), reason=f"{IMAGENET_VAL} not found (set SADAG_SHARED)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where there is no CUDA device (select them with ``-m cuda``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():  # noqa: ANN201
    """Tiny ops: one thread avoids oversubscription slowdowns on a shared CPU (use with pytestmark)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("SADAG_TEST_THREADS", min(2, os.cpu_count() or 1))))


def calibrated_r20(w_bits: int, a_bits: int, iters: int) -> tuple[nn.Module, QuantConfig]:
    """The real ResNet-20 quantized and calibrated for a few iterations on 32 real CIFAR-10 images."""
    from sadag.data import sample_calibration_images
    from sadag.models import load_model

    model, spec = load_model("resnet20_cifar10", weights=str(R20_WEIGHTS))
    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    qmodel = quantize(model, cfg, torch.zeros(1, 3, 32, 32))
    images = sample_calibration_images(CIFAR_TRAIN, spec, 32, seed=0)
    reconstruct_(qmodel, images, CalibConfig(iters=iters, batch_size=16), seed=0)
    return qmodel, cfg


@pytest.fixture(scope="session")
def r20_w4a4() -> tuple[nn.Module, QuantConfig]:
    return calibrated_r20(4, 4, iters=10)


@pytest.fixture(scope="session")
def r20_spec() -> DataSpec:
    from sadag.models import load_model

    return load_model("resnet20_cifar10", pretrained=False)[1]


@pytest.fixture(scope="session")
def cifar_test_slice(r20_spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """20 real CIFAR-10 test images per class (200) and their labels."""
    from sadag.data import ImageFolderDataset

    ds = ImageFolderDataset(CIFAR_TEST, r20_spec, limit=20)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([label for _, label in ds.samples])


@register_unit_type
class BasicBlock(nn.Module):
    """A residual block shaped like torchvision's BasicBlock, registered as a reconstruction unit."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class TinyNet(nn.Module):
    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.block = BasicBlock(c)
        self.head = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.head(self.block(self.stem(x)))).flatten(1))


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so the model behaves like a trained one."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn_(TinyNet())


def no_bn_model():  # noqa: ANN201
    """A factory for `--model conftest:no_bn_model`: a CNN without BatchNorm layers."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    return model.eval(), DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10)


def tiny_bn_model():  # noqa: ANN201
    """A factory for `--model conftest:tiny_bn_model`: TinyNet with trained-looking BN statistics, 16x16 input."""
    torch.manual_seed(0)
    return randomize_bn_(TinyNet()), DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10)


def write_image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (32, 32)) -> None:
    """Random PNG images under root/<class>/, ``per_class`` of each, seeded."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")


def run_killed_at(monkeypatch: pytest.MonkeyPatch, checkpoint: str, cfg, **kwargs) -> None:  # noqa: ANN001, ANN003
    """``sadag.run(cfg, export=False, **kwargs)`` until it writes the checkpoint ``checkpoint`` (a file of the run's
    state/), then die there, as a process killed right after that write would."""
    import sadag
    from sadag.rundir import RunDir

    class Killed(Exception):
        pass

    original = RunDir.save_state

    def save_then_die(self: RunDir, name: str, obj: object) -> None:
        original(self, name, obj)
        if name == checkpoint:
            raise Killed

    monkeypatch.setattr(RunDir, "save_state", save_then_die)
    with pytest.raises(Killed):
        sadag.run(cfg, export=False, **kwargs)
    monkeypatch.setattr(RunDir, "save_state", original)


TINY = ["--model", "conftest:tiny_bn_model", "--preset", "smoke"]  # the CLI's tiny model at the smoke budget


@pytest.fixture
def cli(capsys):  # noqa: ANN001, ANN201
    """Run the `sadag` command in-process: cli(args) -> (exit code, stdout, stderr)."""
    from sadag.cli import main

    def run(args: list[str]) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
