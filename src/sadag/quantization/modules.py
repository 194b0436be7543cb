"""Quantized drop-ins for Conv2d and Linear, swapped in place and reversible.

Which float class becomes which quantized class is a table: a model family whose layers subclass
Conv2d / Linear with their own forward registers a quantized twin with :func:`register_quantized_twin`
(in ``sadag.models``). A subclass that inherits its forward unchanged (e.g. one that only changes
``__init__`` defaults) uses its base class's twin; one with its own forward and no twin stays in full precision.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import ActQuantizer, WeightQuantizer
from .registry import TypeTable


class _QuantMixin:
    """Adds an input quantizer and a weight quantizer to a conv or linear layer."""

    weight: nn.Parameter
    # (gain, bias) of an eval-mode BatchNorm fused into this layer during calibration (fold.bn_fused_into_convs)
    output_affine: tuple[Tensor, Tensor] | None = None

    def _attach(self, w_bits: int, a_bits: int | None, p: float) -> None:
        self.weight_quantizer = WeightQuantizer(self.weight, w_bits, p=p)
        self.input_quantizer: ActQuantizer | None = ActQuantizer(a_bits, p=p)
        self.quantize_weight = True

    def set_weight_bits(self, bits: int, p: float) -> None:
        self.weight_quantizer = WeightQuantizer(self.weight, bits, p=p)

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight) if self.quantize_weight else self.weight

    def quantize_input(self, x: Tensor) -> Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x

    @classmethod
    def from_float(cls, layer: nn.Module, w_bits: int, a_bits: int | None, p: float) -> nn.Module:
        """Turn ``layer`` into this class in place, reusing its parameters (quantize() works on a deep copy).

        ``p`` is the clip-search exponent of both quantizers (``QuantConfig.clip_search_p``).
        """
        layer.__class__ = cls
        layer._attach(w_bits, a_bits, p)
        return layer


class QuantConv2d(_QuantMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.quantized_weight(), self.bias
        if self.output_affine is not None:  # bn(conv(x, w) + b) = conv(x, w * gain) + bias_of_the_fused_bn
            gain, bias = self.output_affine
            weight = weight * gain
        return self._conv_forward(self.quantize_input(x), weight, bias)


class QuantLinear(_QuantMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


_TWINS: TypeTable[type] = TypeTable("quantized twins")


def register_quantized_twin(float_cls: type | str, quant_cls: type) -> type:
    """Quantize every layer of exactly ``float_cls`` as ``quant_cls`` (a subclass of QuantConv2d or QuantLinear).

    ``float_cls`` is the class or its qualified name ``"package.module.Class"`` (for optional packages).
    ``quant_cls.from_float(layer, w_bits, a_bits, p)`` is called on each such layer. Returns ``quant_cls``.
    """
    if not (isinstance(quant_cls, type) and issubclass(quant_cls, (QuantConv2d, QuantLinear))):
        raise TypeError(f"a quantized twin must subclass QuantConv2d or QuantLinear, got {quant_cls!r}")
    _TWINS.register(float_cls, quant_cls)
    return quant_cls


register_quantized_twin(nn.Conv2d, QuantConv2d)
register_quantized_twin(nn.Linear, QuantLinear)


_FORWARD = ("forward", "_conv_forward")  # what a twin's forward replaces (Conv2d.forward calls _conv_forward)


def quant_class_for(module: nn.Module) -> type | None:
    """The quantized class for a layer: the twin registered for its class; for a subclass that inherits
    ``forward`` (and ``_conv_forward``) unchanged from a class with a twin, a class derived from that twin and
    the layer's own class (:func:`_derived_twin`); None for a subclass with its own forward and no twin."""
    cls = type(module)
    found = _TWINS.nearest(cls)
    if found is None:
        return None
    base, twin = found
    if base is cls:
        return twin
    if any(getattr(cls, name, None) is not getattr(base, name, None) for name in _FORWARD):
        return None
    return _derived_twin(twin, cls)


@functools.cache
def _derived_twin(twin: type, cls: type) -> type:
    """``twin``'s quantized forward on a layer that stays an instance of ``cls`` (from_float swaps ``__class__``):
    the model's code may still check its class or call its other methods. One class per (twin, cls), made at
    runtime: a model holding it deep-copies, but does not pickle whole (save its state_dict, or export it)."""
    return type(f"Quant{cls.__name__}", (twin, cls), {"__module__": cls.__module__})


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, (QuantConv2d, QuantLinear))
