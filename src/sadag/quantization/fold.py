"""Fold BatchNorm into the convolution that feeds it (the deployable choice)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .trace import trace_modules


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite conv so that conv(x) equals bn(conv(x)) in eval mode."""
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(gain.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * gain + shift)


def fold_bn_(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d fed directly by a Conv2d; the BN becomes Identity. Returns the pairs."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    trace = trace_modules(model, example, names)
    modules = dict(model.named_modules())
    pairs = []
    for name in names:
        src = trace.producer.get(name)
        if isinstance(modules[name], nn.BatchNorm2d) and src and isinstance(modules[src], nn.Conv2d):
            if trace.consumers.get(src) == [name]:
                pairs.append((src, name))
    for conv_name, bn_name in pairs:
        fold_conv_bn(modules[conv_name], modules[bn_name])
        parent, _, attr = bn_name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, nn.Identity())
    return pairs
