"""Quantized drop-ins for Conv2d and Linear, swapped in place and reversible."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import ActQuantizer, WeightQuantizer


class _QuantMixin:
    """Adds an input quantizer and a weight quantizer to a conv or linear layer."""

    weight: nn.Parameter

    def _attach(self, w_bits: int, a_bits: int | None, p: float) -> None:
        self.weight_quantizer = WeightQuantizer(self.weight, w_bits, p=p)
        self.input_quantizer: ActQuantizer | None = ActQuantizer(a_bits)
        self.quantize_weight = True

    def set_weight_bits(self, bits: int, p: float = 2.4) -> None:
        self.weight_quantizer = WeightQuantizer(self.weight, bits, p=p)

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight) if self.quantize_weight else self.weight

    def quantize_input(self, x: Tensor) -> Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x


class QuantConv2d(_QuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int | None, p: float = 2.4) -> QuantConv2d:
        conv.__class__ = cls  # reuse the parameters; the model was deep-copied before swapping
        conv._attach(w_bits, a_bits, p)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        if isinstance(getattr(self, "static_padding", None), nn.Module):  # TF-"SAME" convs (EfficientNet-Lite)
            x = self.static_padding(x)  # zero padding after quantizing is exact: 0 is on every grid
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int | None, p: float = 2.4) -> QuantLinear:
        linear.__class__ = cls
        linear._attach(w_bits, a_bits, p)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


QUANT_MODULES: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
QuantLayer = QuantConv2d | QuantLinear


def quant_class_for(module: nn.Module) -> type | None:
    """The quantized class for a layer, or None when its forward is one sadag cannot reproduce.

    Plain Conv2d / Linear swap directly; a Conv2d subclass whose only change is a ``static_padding``
    module applied first (EfficientNet's Conv2dStaticSamePadding) is reproduced by QuantConv2d.
    """
    cls = QUANT_MODULES.get(type(module))
    if cls is None and isinstance(module, nn.Conv2d) and isinstance(getattr(module, "static_padding", None), nn.Module):
        cls = QuantConv2d
    return cls


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, (QuantConv2d, QuantLinear))
