"""BatchNorm-statistics losses (Genie's form) and the hooks that feed them."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..quantization.fold import BN_TYPES, has_running_stats
from .common import probe_forward

log = logging.getLogger(__name__)

# Genie adds this fixed eps (not the layer's own) to running_var before the square root.
BN_STD_EPS = 1e-6


def shown_names(names: Sequence[str]) -> str:
    """At most 8 names, comma-separated, and how many more (error messages)."""
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Every BatchNorm2d (or SyncBatchNorm) in module order; raises ModelError when there is none, or when some
    have no running statistics to match."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
    if not named:
        raise ModelError(
            f"{type(model).__name__} has no BatchNorm2d layers: the BN-based methods (genie, sadag, zeroq) "
            "need BatchNorm statistics to generate data; use --method noise or --method real instead"
        )
    untracked = [n or type(m).__name__ for n, m in named if not has_running_stats(m)]
    if untracked:
        raise ModelError(
            f"{type(model).__name__}: BatchNorm layer(s) {shown_names(untracked)} have no running statistics "
            "(track_running_stats=False): the BN-based methods (genie, sadag, zeroq) match the images to those "
            "statistics, so they need a model trained with track_running_stats=True; use --method noise or "
            "--method real (real calibration images) instead"
        )
    return [m for _, m in named]


def reached_bn_layers(model: nn.Module, input_size: int) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers (module order) that an eval-mode forward reaches, found by one no-grad probe of one
    zero image of `input_size` pixels.

    A layer the forward never runs (e.g. an auxiliary head used only in training) has no input whose statistics
    could match its own: it is left out, with a warning. ModelError when no layer is reached.
    """
    layers = bn_layers(model)  # the actionable errors first: no BN at all, or BN without running statistics
    seen: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, _i, _o: seen.add(id(mod))) for m in layers]
    try:
        probe_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()
    missed = [n or type(m).__name__ for n, m in model.named_modules() if isinstance(m, BN_TYPES) and id(m) not in seen]
    if len(missed) == len(layers):
        raise ModelError(f"{type(model).__name__}: the eval-mode forward pass reaches none of its BatchNorm2d layers "
                         f"({shown_names(missed)}), so the BN-based methods (genie, sadag, zeroq) have no statistics "
                         "to match; use --method noise or --method real instead")
    if missed:
        log.warning("%s: BatchNorm2d layer(s) %s are not reached by the eval-mode forward pass (e.g. a head used "
                    "only in training); their statistics are not matched", type(model).__name__, shown_names(missed))
    return [m for m in layers if id(m) in seen]


@contextlib.contextmanager
def capture_bn_inputs(model: nn.Module, layers: Sequence[nn.BatchNorm2d] | None = None
                      ) -> Iterator[list[Tensor | None]]:
    """Yield a list whose slot i holds the latest input of the i-th of `layers` (default: every BatchNorm2d of
    the model, in module order; reached_bn_layers gives those a forward runs).

    Slots are overwritten at every forward; the hooks are removed on exit, also on error.
    """
    layers = bn_layers(model) if layers is None else list(layers)
    captured: list[Tensor | None] = [None] * len(layers)

    def make_hook(i: int):
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
            captured[i] = inputs[0]
        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(layers)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def bn_targets(layers: Sequence[nn.BatchNorm2d]) -> list[tuple[Tensor, Tensor]]:
    """(running_mean, sqrt(running_var + 1e-6)) per layer, detached."""
    return [(m.running_mean.detach(), torch.sqrt(m.running_var.detach() + BN_STD_EPS)) for m in layers]


def _shifted_moments(x: Tensor, center: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per group, the mean and unbiased std over (N, H, W) of x: (G*B, C, ...) as G batches of B.

    One pass of sums of y and y^2 with y = x - center: 2.5x faster than std_mean forward and backward
    on CPU, and centring on the target mean keeps the variance free of cancellation (error ~1e-7).
    """
    x = x.float()  # bf16 activations under autocast: the moments in fp32
    # (G, B, C, H, W): a view in any memory layout (channels_last activations on CPU)
    y = (x - center.view(1, -1, *([1] * (x.dim() - 2)))).unflatten(0, (groups, -1))
    dims = (1, *range(3, y.dim()))
    n = y.shape[1] * math.prod(y.shape[3:])
    s1 = y.sum(dim=dims)
    s2 = y.square().sum(dim=dims)
    shifted_mean = s1 / n
    var = (s2 - s1 * shifted_mean) / max(n - 1, 1)
    return shifted_mean + center, _sqrt_zero_grad_at_zero(var)


def _sqrt_zero_grad_at_zero(var: Tensor) -> Tensor:
    """sqrt of a variance, with gradient 0 where it is 0 or negative (rounding): one value per channel (a batch
    of one at 1x1) or a constant channel, where sqrt's infinite slope times a zero gradient makes NaN."""
    positive = var > 0
    return torch.where(positive, var.where(positive, 1.0).sqrt(), 0.0)


def reached_inputs(inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """The captured BN inputs; ModelError when a hooked layer saw none (a forward that skipped it)."""
    missing = [i for i, x in enumerate(inputs) if x is None]
    if missing:
        raise ModelError(f"the forward pass did not reach the hooked BatchNorm2d layer(s) number {missing} (of "
                         f"{len(inputs)}): hook only the layers reached_bn_layers finds, or give the model a forward "
                         "pass that runs the same layers for every input")
    return [x for x in inputs if x is not None]


def bn_statistics_losses(inputs: Sequence[Tensor | None], bn_layers: Sequence[nn.BatchNorm2d],
                         groups: int = 1) -> Tensor:
    """Genie's BN loss of each of `groups` equal batches concatenated along N: shape (groups,).

    Per batch, the sum over layers of (||mu_B - mu||^2 + ||sigma_B - sigma||^2) / C, where mu_B, sigma_B
    are the batch mean and unbiased std of the layer input over (N, H, W); sigma = sqrt(running_var + 1e-6).
    """
    total: Tensor | None = None
    for x, (mean, std) in zip(reached_inputs(inputs), bn_targets(bn_layers), strict=True):
        b_mean, b_std = _shifted_moments(x, mean, groups)
        term = ((b_mean - mean).square().sum(1) + (b_std - std).square().sum(1)) / mean.numel()
        total = term if total is None else total + term
    assert total is not None
    return total


def bn_statistics_loss(inputs: Sequence[Tensor | None], bn_layers: Sequence[nn.BatchNorm2d]) -> Tensor:
    """Genie's BN loss of one batch (a scalar): see bn_statistics_losses."""
    return bn_statistics_losses(inputs, bn_layers).sum()


def input_prior_losses(x: Tensor, groups: int = 1) -> Tensor:
    """Per batch of `groups` equal batches concatenated along N: each image's per-channel mean pushed to 0
    and (unbiased) std to 1, summed, averaged over the batch's images. Shape (groups,)."""
    std, mean = torch.std_mean(x, dim=(2, 3))
    per_image = mean.square().sum(1) + (std - 1.0).square().sum(1)
    return per_image.view(groups, -1).mean(1)


def input_prior_loss(x: Tensor) -> Tensor:
    """Push each image's per-channel mean to 0 and (unbiased) std to 1; summed, averaged over images."""
    return input_prior_losses(x).sum()
