"""Split a model into reconstruction units: the stem, each residual block, the classifier.

Model families declare their block classes with :func:`register_unit_type` where they are defined
(``sadag.models``), so this module names no architecture. Layers outside every registered block
become units of their own (the fallback for unknown architectures).
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from ..errors import ConfigError
from .registry import TypeTable
from .trace import trace_modules

log = logging.getLogger(__name__)

_UNIT_TYPES: TypeTable[bool] = TypeTable("reconstruction unit types")


def register_unit_type(cls: type | str) -> type | str:
    """Treat every module of exactly this class as one reconstruction unit (usable as a class decorator).

    ``cls`` is the class, or its qualified name ``"package.module.Class"`` for a class of an optional
    package that must not be imported yet (e.g. ``"some_package.blocks.ResidualBlock"``).
    """
    _UNIT_TYPES.register(cls, True)
    return cls


def is_unit_type(module: nn.Module) -> bool:
    return type(module) in _UNIT_TYPES


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def _detect(module: nn.Module, prefix: str = "") -> list[str]:
    units = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if is_unit_type(child) or _is_layer(child):
            units.append(full)
        else:
            units.extend(_detect(child, full + "."))
    return units


def find_units(model: nn.Module, example: Tensor, names: list[str] | None = None) -> list[str]:
    """Unit module names in execution order. ``names`` overrides detection; uncovered layers are added.

    A detected unit that the forward pass never calls (a layer the model holds but does not use) has no
    inputs to reconstruct from: it is left out, with a warning; a given name that is never called is refused.
    """
    modules = dict(model.named_modules())
    if names:
        _check_names(names, modules)
        units = list(names)
        covered = {n for n in modules if any(n == u or n.startswith(u + ".") for u in units)}
        units += [n for n, m in modules.items() if _is_layer(m) and n not in covered]
    else:
        units = _detect(model)
    if not units:
        raise ConfigError("the model has no Conv2d or Linear layer to quantize")
    order = trace_modules(model, example, units).order
    unused = [u for u in units if u not in order]
    if names and (given := [u for u in unused if u in names]):
        raise ConfigError(f"units {', '.join(given)} are never called by the model's forward pass, so they cannot "
                          "be reconstructed: leave them out of quant.units (--units)")
    if unused:
        log.warning("not calibrated: %s (never called by the forward pass on an example input)", ", ".join(unused))
    return order


def check_unit_names(model: nn.Module, names: list[str] | None) -> None:
    """quant.units names modules of ``model``, each once, none inside another (checkable before any work)."""
    if names:
        _check_names(names, dict(model.named_modules()))


def _check_names(names: list[str], modules: dict[str, nn.Module]) -> None:
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(
            f"unknown unit module names: {', '.join(missing)}; "
            f"valid names include: {', '.join(list(modules)[1:20])} ..."
        )
    if len(set(names)) < len(names):
        raise ConfigError(f"quant.units (--units) names a module twice: {', '.join(names)}")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        outer, inner = nested[0]
        raise ConfigError(f"unit {inner!r} lies inside unit {outer!r}: a module can be reconstructed in one unit "
                          "only; give either the block or its parts in quant.units (--units)")


def unit_layers(model: nn.Module, unit: str) -> list[str]:
    """Names of the conv/linear layers inside a unit (the unit itself when it is a layer)."""
    return [n for n, m in model.named_modules() if (n == unit or n.startswith(unit + ".")) and _is_layer(m)]
