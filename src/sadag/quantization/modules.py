"""Quantized drop-ins for Conv2d and Linear, swapped in place and reversible.

Which float class becomes which quantized class is a table: a model family whose layers subclass
Conv2d / Linear with their own forward registers a quantized twin with :func:`register_quantized_twin`
(in ``sadag.models``); a subclass without a twin stays in full precision.
"""

from __future__ import annotations

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


def quant_class_for(module: nn.Module) -> type | None:
    """The quantized class for a layer, or None when no twin is registered for its exact class."""
    return _TWINS.lookup(type(module))


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, (QuantConv2d, QuantLinear))
