"""ZeroQ baseline: pixels optimized directly to match BatchNorm statistics, per sample."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import GenConfig
from ..models.spec import DataSpec
from .bn_stats import BN_STD_EPS, bn_layers, bn_targets, capture_bn_inputs
from .common import (
    LOG_EVERY,
    DevicePlateau,
    Progress,
    StageMonitor,
    batch_seed,
    cpu_generator,
    frozen_eval,
    model_device,
    tensor_lr_adam,
)
from .genie import batch_sizes

log = logging.getLogger(__name__)

_HINT = "lower gen.zeroq_lr or check that the model's forward pass is finite"


def _per_sample_stat_loss(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """ZeroQ's ||mu - mu_i||^2 + ||sigma - sigma_i||^2 summed over (N, C), divided by N.

    mu_i, sigma_i are each sample's spatial mean and sqrt(unbiased var + 1e-6).
    """
    flat = x.flatten(2)
    var, m = torch.var_mean(flat, dim=2)
    s = torch.sqrt(var + BN_STD_EPS)
    return ((m - mean).square().sum() + (s - std).square().sum()) / x.shape[0]


def zeroq_loss(inputs: Sequence[Tensor | None], layers: Sequence[nn.BatchNorm2d], x: Tensor) -> Tensor:
    """Per-sample BN-statistics loss of every BN input plus the same term on the image (target 0 / 1).

    ZeroQ hooks conv outputs paired with BN layers; the BN inputs are the same tensors in conv-BN
    networks and stay correct in networks where they are not.
    """
    total = _per_sample_stat_loss(x, torch.zeros_like(x[0, :, 0, 0]), torch.ones_like(x[0, :, 0, 0]))
    for a, (mean, std) in zip(inputs, bn_targets(layers), strict=True):
        assert a is not None, "a BatchNorm2d layer was not reached by the forward pass"
        total = total + _per_sample_stat_loss(a, mean, std)
    return total


def generate_zeroq(model: nn.Module, spec: DataSpec, cfg: GenConfig, seed: int,
                   progress: Progress | None = None, log_every: int = LOG_EVERY) -> Tensor:
    """ZeroQ distilled data, (N, 3, S, S) float32 on CPU in the model's normalized input space.

    Adam (lr cfg.zeroq_lr) with ZeroQ's ReduceLROnPlateau (patience cfg.plateau_patience, min lr
    cfg.min_lr_z; ZeroQ's 100 / 1e-4 are those fields' defaults), cfg.zeroq_iters per batch.
    """
    cfg.validate()
    bn_layers(model)
    device = model_device(model)
    sizes = batch_sizes(cfg.num_images, cfg.batch_size)
    monitor = StageMonitor("zeroq", len(sizes) * cfg.zeroq_iters, progress, log, _HINT, log_every)
    out = []
    with frozen_eval(model), torch.enable_grad(), capture_bn_inputs(model) as captured:
        layers = bn_layers(model)
        for b, size in enumerate(sizes):
            out.append(_zeroq_batch(model, layers, captured, spec, cfg, seed, b, size, device, monitor))
    return torch.cat(out)


def _zeroq_batch(model: nn.Module, layers: list[nn.BatchNorm2d], captured: list, spec: DataSpec,
                 cfg: GenConfig, seed: int, index: int, size: int, device: torch.device,
                 monitor: StageMonitor) -> Tensor:
    s = spec.input_size
    x = torch.randn(size, 3, s, s, generator=cpu_generator(batch_seed(seed, index, "zeroq")))
    x = x.to(device).requires_grad_()
    opt = tensor_lr_adam([x], cfg.zeroq_lr, device)
    plateau = DevicePlateau(opt.param_groups[0]["lr"], patience=cfg.plateau_patience, min_lr=cfg.min_lr_z)
    iters = cfg.zeroq_iters
    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        model(x)
        loss = zeroq_loss(captured, layers, x)
        loss.backward()
        opt.step()
        plateau.step(loss)
        monitor.observe(loss)
        if monitor.due(it, iters):
            monitor.report(index, it, index * iters + it + 1, {"loss": loss, "lr": plateau.lr})
    monitor.check(index, max(iters - 1, 0))
    return x.detach().float().cpu()
