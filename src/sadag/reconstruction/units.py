"""Split a model into reconstruction units: the stem, each residual block, the classifier.

Block types are named by class name, so the quantization code never imports model files.
Layers outside every block become units of their own (the fallback for unknown architectures).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..quantization.trace import trace_modules

# CIFAR option-A and torchvision ResNets, pytorchcv ResNets, MobileNetV2, EfficientNet-Lite.
UNIT_TYPES: set[str] = {"BasicBlock", "Bottleneck", "CifarResUnit", "InvertedResidual", "MBConvBlock"}


def register_unit_type(cls: type) -> type:
    """Treat every module of this class as one reconstruction unit (usable as a decorator)."""
    UNIT_TYPES.add(cls.__name__)
    return cls


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def _detect(module: nn.Module, prefix: str = "") -> list[str]:
    units = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if type(child).__name__ in UNIT_TYPES or _is_layer(child):
            units.append(full)
        else:
            units.extend(_detect(child, full + "."))
    return units


def find_units(model: nn.Module, example: Tensor, names: list[str] | None = None) -> list[str]:
    """Unit module names in execution order. ``names`` overrides detection; uncovered layers are added."""
    modules = dict(model.named_modules())
    if names:
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(
                f"unknown unit module names: {', '.join(missing)}; "
                f"valid names include: {', '.join(list(modules)[1:20])} ..."
            )
        units = list(names)
        covered = {n for n in modules if any(n == u or n.startswith(u + ".") for u in units)}
        units += [n for n, m in modules.items() if _is_layer(m) and n not in covered]
    else:
        units = _detect(model)
    if not units:
        raise ConfigError("the model has no Conv2d or Linear layer to quantize")
    order = trace_modules(model, example, units).order
    unused = [u for u in units if u not in order]
    return [u for u in order] + unused


def unit_layers(model: nn.Module, unit: str) -> list[str]:
    """Names of the conv/linear layers inside a unit (the unit itself when it is a layer)."""
    return [n for n, m in model.named_modules() if (n == unit or n.startswith(unit + ".")) and _is_layer(m)]
