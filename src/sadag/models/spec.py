"""Preprocessing metadata that travels with every model."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from ..errors import ConfigError


def _positive_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


def _check_channels(name: str, values: object) -> None:
    """Three finite numbers: one per RGB channel."""
    if isinstance(values, str | bytes) or not hasattr(values, "__len__") or len(values) != 3:
        raise ConfigError(f"DataSpec.{name} must hold 3 numbers, one per RGB channel (sadag supports 3-channel RGB "
                          f"models only), got {values!r}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ConfigError(f"DataSpec.{name} must hold 3 finite numbers, got {values!r}")


@dataclass(frozen=True)
class DataSpec:
    """How a model expects its input images.

    Images are RGB in [0, 1], resized to ``input_size`` and normalised per channel
    with ``mean`` / ``std`` before they reach the model.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # square side in pixels (32 for CIFAR, 224 for ImageNet)
    num_classes: int
    resize: int | None = None  # shorter side before the centre crop; None = resize straight to input_size

    def __post_init__(self) -> None:
        # a wrong spec would fail much later (inf after normalize, a model that does not fit): refuse it here
        _check_channels("mean", self.mean)
        _check_channels("std", self.std)
        if not all(v > 0 for v in self.std):
            raise ConfigError(f"DataSpec.std must be > 0 in every channel (images are divided by it), got {self.std!r}")
        for name, value in (("input_size", self.input_size), ("num_classes", self.num_classes)):
            if not _positive_int(value):
                raise ConfigError(f"DataSpec.{name} must be a positive integer, got {value!r}")
        if self.resize is not None and not _positive_int(self.resize):
            raise ConfigError(f"DataSpec.resize must be a positive integer or None, got {self.resize!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        return cls(
            mean=tuple(d["mean"]), std=tuple(d["std"]), input_size=int(d["input_size"]),
            num_classes=int(d["num_classes"]), resize=d.get("resize"),
        )


CIFAR_SPEC_MEAN = (0.485, 0.456, 0.406)
CIFAR_SPEC_STD = (0.229, 0.224, 0.225)
