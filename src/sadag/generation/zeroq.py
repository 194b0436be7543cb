"""ZeroQ baseline: pixels optimized directly to match BatchNorm statistics, per sample."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import GenConfig
from ..models.spec import DataSpec
from .bn_stats import BN_STD_EPS, bn_targets, capture_bn_inputs, reached_bn_layers, reached_inputs
from .common import (
    LOG_EVERY,
    Progress,
    StageMonitor,
    batch_seed,
    check_model_dtype,
    cpu_generator,
    frozen_eval,
    model_device,
    plateau_adam,
)
from .genie import auto_parallel_batches, batch_groups, batch_sizes

log = logging.getLogger(__name__)

_HINT = "lower gen.zeroq_lr or check that the model's forward pass is finite"


def _per_sample_stat_loss(x: Tensor, mean: Tensor, std: Tensor, groups: int = 1) -> Tensor:
    """ZeroQ's ||mu - mu_i||^2 + ||sigma - sigma_i||^2 summed over (N, C), divided by N, per batch of
    `groups` equal batches concatenated along N: shape (groups,).

    mu_i, sigma_i are each sample's spatial mean and sqrt(unbiased var + 1e-6).
    """
    flat = x.flatten(2)
    var, m = torch.var_mean(flat, dim=2, correction=1 if flat.shape[2] > 1 else 0)  # 1x1 maps: variance 0
    s = torch.sqrt(var + BN_STD_EPS)
    per_sample = (m - mean).square().sum(1) + (s - std).square().sum(1)
    return per_sample.view(groups, -1).mean(1)


def zeroq_losses(inputs: Sequence[Tensor | None], layers: Sequence[nn.BatchNorm2d], x: Tensor,
                 groups: int = 1) -> Tensor:
    """Per-sample BN-statistics loss of every BN input plus the same term on the image (target 0 / 1), per
    batch of `groups` equal batches concatenated along N: shape (groups,).

    ZeroQ hooks conv outputs paired with BN layers; the BN inputs are the same tensors in conv-BN
    networks and stay correct in networks where they are not.
    """
    total = _per_sample_stat_loss(x, torch.zeros_like(x[0, :, 0, 0]), torch.ones_like(x[0, :, 0, 0]), groups)
    for a, (mean, std) in zip(reached_inputs(inputs), bn_targets(layers), strict=True):
        total = total + _per_sample_stat_loss(a, mean, std, groups)
    return total


def generate_zeroq(model: nn.Module, spec: DataSpec, cfg: GenConfig, seed: int,
                   progress: Progress | None = None, log_every: int = LOG_EVERY,
                   only: Sequence[int] | None = None) -> Tensor:
    """ZeroQ distilled data, (N, 3, S, S) float32 on CPU in the model's normalized input space.

    Adam (lr cfg.zeroq_lr) with ZeroQ's ReduceLROnPlateau (patience cfg.plateau_patience, min lr
    cfg.min_lr_z; ZeroQ's 100 / 1e-4 are those fields' defaults), cfg.zeroq_iters per batch. Batches of
    equal size run cfg.parallel_batches at a time (0: as Genie-D decides) with per-batch optimizers.
    `only`: the batches to make (torchrun's ranks split them), concatenated in that order; all by default.
    """
    cfg.validate()
    check_model_dtype(model)  # its pixels are made in torch's default dtype
    layers = reached_bn_layers(model, spec.input_size)
    device = model_device(model)
    sizes = batch_sizes(cfg.num_images, cfg.batch_size)
    parallel = cfg.parallel_batches or auto_parallel_batches(model, spec, cfg.batch_size, len(sizes))
    monitor = StageMonitor("zeroq", len(sizes) * cfg.zeroq_iters, progress, log, _HINT, log_every)
    out = []
    with frozen_eval(model), torch.enable_grad(), capture_bn_inputs(model, layers) as captured:
        for group in batch_groups(sizes, parallel, (), only):
            out.extend(_zeroq_group(model, layers, captured, spec, cfg, seed, group, sizes[group[0]], device,
                                    monitor))
    return torch.cat(out)


def _zeroq_group(model: nn.Module, layers: list[nn.BatchNorm2d], captured: list, spec: DataSpec,
                 cfg: GenConfig, seed: int, indices: list[int], size: int, device: torch.device,
                 monitor: StageMonitor) -> list[Tensor]:
    s, count = spec.input_size, len(indices)
    xs = [torch.randn(size, 3, s, s, generator=cpu_generator(batch_seed(seed, b, "zeroq"))).to(device).requires_grad_()
          for b in indices]
    opts, plateaus = zip(*[plateau_adam([x], cfg.zeroq_lr, device, patience=cfg.plateau_patience,
                                        min_lr=cfg.min_lr_z) for x in xs], strict=True)
    iters = cfg.zeroq_iters
    for it in range(iters):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        x = xs[0] if count == 1 else torch.cat(xs)
        model(x)
        losses = zeroq_losses(captured, layers, x, count)
        losses.sum().backward()
        for opt, plateau, loss in zip(opts, plateaus, losses, strict=True):
            opt.step()
            plateau.step(loss)
        monitor.observe(losses.sum())
        if monitor.due(it, iters):
            monitor.report_group(indices, it, iters, [{"loss": losses[k], "lr": plateaus[k].lr} for k in range(count)])
    monitor.check(indices[-1], max(iters - 1, 0))
    return [x.detach().float().cpu() for x in xs]
