"""Fold BatchNorm into the convolution that feeds it: for good (the deployable choice, before quantizing) or for
the duration of a unit's calibration (the quantized weight times the BN's gain: the same function, fewer passes)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from .modules import QuantConv2d
from .trace import trace_modules

log = logging.getLogger(__name__)
# nn.SyncBatchNorm in eval mode normalises with its running statistics exactly as BatchNorm2d does (it only syncs
# batch statistics when training under torch.distributed): generation and folding take it unchanged.
BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite conv so that conv(x) equals bn(conv(x)) in eval mode."""
    gain, bias = bn_affine(bn, conv.bias)
    conv.weight.mul_(gain)
    conv.bias = nn.Parameter(bias)


def bn_affine(bn: nn.BatchNorm2d, conv_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(gain shaped (C, 1, 1, 1), bias) with bn(conv(x, w) + conv_bias) = conv(x, w * gain) + bias (eval mode)."""
    if not has_running_stats(bn):
        raise ModelError(f"{type(bn).__name__} has no running statistics (track_running_stats=False): it normalises "
                         "with each batch's own statistics, which no fixed conv weight and bias can reproduce; "
                         "it cannot be folded")
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv_bias if conv_bias is not None else torch.zeros_like(bn.running_mean)
    return gain.reshape(-1, 1, 1, 1).detach(), ((bias - bn.running_mean) * gain + shift).detach()


@torch.no_grad()
def fold_bn_(model: nn.Module, example: Tensor, pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d (or SyncBatchNorm, the same in eval mode) with running statistics fed directly by a
    Conv2d; the BN becomes Identity. Returns the pairs (a BN without running statistics normalises with the batch's
    own: it stays as it is).

    The trace links modules by tensor identity, so it cannot see a conv output changed in place before its BN
    (conv -> ReLU(inplace) -> BN) or also read by a functional op: the model's output on a random input is
    compared before and after, and a fold that changes it is undone (and named in a warning).

    ``pairs``: fold exactly these, each a direct conv -> BN pair (e.g. an export's plan): that output test depends
    on the weights, so a rebuilt model with fresh ones could decide otherwise.
    """
    if pairs is not None:
        return _fold_exactly(model, example, pairs)
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example)

    def output() -> Tensor:
        return model(x.clone())  # a model may change its input in place

    reference = output()
    pairs = _direct_pairs(model, example, (nn.Conv2d, BN_TYPES))
    folds = [_fold(model, c, b) for c, b in pairs]
    if pairs and not _same_output(output(), reference):  # find the culprits one by one
        for undo in reversed(folds):
            undo()
        kept = []
        for c, b in pairs:
            undo = _fold(model, c, b)
            if _same_output(output(), reference):
                kept.append((c, b))
            else:
                undo()
                log.warning("not folding BatchNorm %s into %s: the model's output changes (the conv's output is "
                            "modified in place or used outside the BatchNorm)", b, c)
        pairs = kept
    return pairs


def _fold_exactly(model: nn.Module, example: Tensor, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fold the given pairs, each checked against the structure (the trace), not against the outputs."""
    pairs = [(c, b) for c, b in pairs]  # tuples: a file's pairs are JSON lists
    allowed = _direct_pairs(model, example, (nn.Conv2d, BN_TYPES))
    bad = [p for p in pairs if p not in allowed] or [p for k, p in enumerate(pairs) if p in pairs[:k]]
    if bad:
        raise ConfigError(f"cannot fold BatchNorm pairs {bad[:3]}: each must be a Conv2d whose only consumer is a "
                          f"BatchNorm with running statistics, named once; this model's foldable pairs are "
                          f"{allowed[:5]}{' ...' if len(allowed) > 5 else ''}")
    for c, b in pairs:
        _fold(model, c, b)
    return pairs


def _fold(model: nn.Module, conv_name: str, bn_name: str) -> Callable[[], None]:
    """Fold one pair for good; returns the function that undoes it."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    weight, bias = conv.weight.detach().clone(), conv.bias

    def undo() -> None:
        conv.weight.copy_(weight)
        conv.bias = bias
        _set_child(model, bn_name, bn)

    fold_conv_bn(conv, bn)
    _set_child(model, bn_name, nn.Identity())
    return undo


def _direct_pairs(model: nn.Module, example: Tensor,
                  kinds: tuple[type, type | tuple[type, ...]]) -> list[tuple[str, str]]:
    """(conv, bn) names where the BN, one with running statistics, takes the conv's output and is its only traced
    consumer."""
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, kinds)]
    trace = trace_modules(model, example, names)
    return [(src, name) for name in names
            if isinstance(modules[name], kinds[1]) and has_running_stats(modules[name])
            and (src := trace.producer.get(name))
            and isinstance(modules[src], kinds[0]) and trace.consumers.get(src) == [name]]


def _fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """A conv whose forward is QuantConv2d's (twins with their own forward ignore output_affine) and a plain
    eval-mode BN with running statistics."""
    return (type(conv).forward is QuantConv2d.forward and type(bn).forward is nn.BatchNorm2d.forward
            and not bn.training and has_running_stats(bn))


def has_running_stats(bn: nn.Module) -> bool:
    """Whether a BN normalises with running statistics (not each batch's own: track_running_stats=False)."""
    return getattr(bn, "running_mean", None) is not None and getattr(bn, "running_var", None) is not None


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, child)


@contextlib.contextmanager
def bn_fused_into_convs(unit: nn.Module, example: Tensor) -> Iterator[list[tuple[str, str]]]:
    """Within the block: each eval-mode BatchNorm fed only by a quantized conv becomes Identity and the conv
    applies it (its quantized weight times the BN's gain, the BN's shift as bias); restored on exit.

    The trace sees module-to-module links only, so the fused unit's output on ``example`` is compared with the
    unfused one: a conv output also used outside its BN (not visible to the trace) changes it, and then nothing
    is fused. Yields the fused (conv, bn) pairs.
    """
    with torch.no_grad():
        pairs = [(c, b) for c, b in _direct_pairs(unit, example, (QuantConv2d, nn.BatchNorm2d))
                 if _fusable(unit.get_submodule(c), unit.get_submodule(b))]
        bns = {b: unit.get_submodule(b) for _, b in pairs}
        reference = unit(example) if pairs else None
    try:
        with torch.no_grad():
            for c, b in pairs:
                conv = unit.get_submodule(c)
                conv.output_affine = bn_affine(bns[b], conv.bias)
                _set_child(unit, b, nn.Identity())
            if pairs and not _same_output(unit(example), reference):
                log.warning("not fusing BatchNorm into the convs of %s during calibration: the fused block's "
                            "output differs (a conv output used outside its BatchNorm)", type(unit).__name__)
                _unfuse(unit, pairs, bns)
                pairs = []
        yield pairs
    finally:
        _unfuse(unit, pairs, bns)


def _unfuse(unit: nn.Module, pairs: list[tuple[str, str]], bns: dict[str, nn.Module]) -> None:
    for c, b in pairs:
        unit.get_submodule(c).output_affine = None
        _set_child(unit, b, bns[b])


def _same_output(out: Tensor, reference: Tensor) -> bool:
    """Equal up to float rounding, which may move a few elements by one quantization step downstream."""
    return bool((out - reference).norm() <= 1e-3 * reference.norm() + 1e-12)
