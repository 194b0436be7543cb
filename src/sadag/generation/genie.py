"""Genie-D: per-batch generator + latents trained to match the FP model's BatchNorm statistics."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import GenConfig
from ..errors import ConfigError
from ..models.spec import DataSpec
from .bn_stats import bn_layers, bn_statistics_loss, capture_bn_inputs, input_prior_loss
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
from .generator import GenieGenerator
from .swing import swing_model

log = logging.getLogger(__name__)

_HINT = "lower the learning rates (gen.lr_z, gen.lr_g) or check that the model's forward pass is finite"


@dataclass
class GenieBatch:
    """One finished Genie-D batch: enough to resume it or to refine it with SADAG (CPU tensors).

    `images` is the generator output of the last iteration (as in Genie); `generator_state` and `z`
    are the values after that iteration's update, which SADAG's refinement continues from.
    """

    index: int
    generator_state: dict[str, Tensor]
    z: Tensor
    images: Tensor


def batch_sizes(num_images: int, batch_size: int) -> list[int]:
    """ceil(num / batch_size) batches; the last one holds the remainder."""
    count = math.ceil(num_images / batch_size)
    return [min(batch_size, num_images - b * batch_size) for b in range(count)]


def init_batch(spec: DataSpec, cfg: GenConfig, seed: int, index: int, size: int,
               device: torch.device) -> tuple[GenieGenerator, Tensor]:
    """A fresh generator and latents for batch `index`, seeded from (seed, index) only, on CPU first
    so the values do not depend on the device or on the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_seed(seed, index, "genie-g"))
        gen = GenieGenerator(spec.input_size, cfg.latent_dim)
    z = torch.randn(size, cfg.latent_dim, generator=cpu_generator(batch_seed(seed, index, "genie-z")))
    return gen.to(device).train(), z.to(device).requires_grad_()


def load_batch_generator(batch: GenieBatch, spec: DataSpec, cfg: GenConfig,
                         device: torch.device) -> tuple[GenieGenerator, Tensor]:
    """Rebuild a finished batch's generator (train mode) and trainable latents on `device`."""
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
        gen = GenieGenerator(spec.input_size, cfg.latent_dim)
    gen.load_state_dict(batch.generator_state)
    z = batch.z.detach().clone().to(device).requires_grad_()
    return gen.to(device).train(), z


def to_batch(index: int, gen: nn.Module, z: Tensor, images: Tensor) -> GenieBatch:
    state = {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()}
    return GenieBatch(index, state, z.detach().cpu().clone(), images.detach().float().cpu().clone())


def _check_done(done: dict[int, GenieBatch], sizes: Sequence[int]) -> None:
    for b, batch in done.items():
        if not 0 <= b < len(sizes) or batch.images.shape[0] != sizes[b]:
            raise ConfigError(
                f"checkpointed Genie batch {b} ({batch.images.shape[0]} images) does not fit this run's "
                f"{len(sizes)} batches of {list(sizes)}: num_images or batch_size changed; delete the "
                "checkpoint or restore the original settings"
            )


# (batch index, iteration, generator, z, that iteration's images): a look inside Genie-D at its log points
GenieInspector = Callable[[int, int, GenieGenerator, Tensor, Tensor], None]


def _genie_batch(net: nn.Module, layers: list[nn.BatchNorm2d], captured: list, spec: DataSpec,
                 cfg: GenConfig, seed: int, index: int, size: int, monitor: StageMonitor,
                 on_log: GenieInspector | None) -> GenieBatch:
    device = model_device(net)
    gen, z = init_batch(spec, cfg, seed, index, size, device)
    opt_z = tensor_lr_adam([z], cfg.lr_z, device)
    plateau = DevicePlateau(opt_z.param_groups[0]["lr"], patience=cfg.plateau_patience, min_lr=cfg.min_lr_z)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g)
    iters, x = cfg.genie_iters, None
    for it in range(iters):
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        x = gen(z)
        net(x)
        loss = bn_statistics_loss(captured, layers) + input_prior_loss(x)
        loss.backward()
        opt_z.step()
        opt_g.step()
        plateau.step(loss)
        if (it + 1) % cfg.g_decay_every == 0:  # Genie's ExponentialLR stepped every 100 iterations
            opt_g.param_groups[0]["lr"] = cfg.lr_g * cfg.g_decay ** ((it + 1) // cfg.g_decay_every)
        monitor.observe(loss)
        if monitor.due(it, iters):
            monitor.report(index, it, index * iters + it + 1, {"loss": loss, "lr_z": plateau.lr})
            if on_log is not None:
                on_log(index, it, gen, z.detach(), x.detach())
    if x is None:
        with torch.no_grad():
            x = gen(z)
    monitor.check(index, max(iters - 1, 0))
    return to_batch(index, gen, z, x)


def generate_genie(
    model: nn.Module,
    spec: DataSpec,
    cfg: GenConfig,
    seed: int,
    *,
    done: dict[int, GenieBatch] | None = None,
    on_batch: Callable[[GenieBatch], None] | None = None,
    progress: Progress | None = None,
    log_every: int = LOG_EVERY,
    on_log: GenieInspector | None = None,
) -> list[GenieBatch]:
    """Genie-D (docs/method.md section 2) for every batch not already in `done`, in batch order.

    The model is used frozen and in eval mode (its flags are restored after); with cfg.swing the BN
    loss is taken through a swing-conv copy. `on_batch` receives each newly finished batch; `on_log`
    (diagnostics, e.g. benchmarks/genie_collapse.py) sees the generator, z and images at every log point.
    """
    cfg.validate()
    bn_layers(model)  # fail early, with the actionable message, on a model without BN
    sizes = batch_sizes(cfg.num_images, cfg.batch_size)
    done = dict(done or {})
    _check_done(done, sizes)
    monitor = StageMonitor("genie-d", len(sizes) * cfg.genie_iters, progress, log, _HINT, log_every)
    out: list[GenieBatch] = []
    with frozen_eval(model), torch.enable_grad():
        offsets = torch.Generator()
        net = swing_model(model, offsets) if cfg.swing else model
        layers = bn_layers(net)
        with capture_bn_inputs(net) as captured:
            for b, size in enumerate(sizes):
                if b in done:
                    out.append(done[b])
                    continue
                offsets.manual_seed(batch_seed(seed, b, "swing"))
                batch = _genie_batch(net, layers, captured, spec, cfg, seed, b, size, monitor, on_log)
                log.info("genie-d: batch %d/%d done (%d images)", b + 1, len(sizes), size)
                out.append(batch)
                if on_batch is not None:
                    on_batch(batch)
    return out
