"""Preprocessing metadata that travels with every model."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
