"""Genie-D: per-batch generator + latents trained to match the FP model's BatchNorm statistics."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import GenConfig, check_bn_scope
from ..errors import ConfigError
from ..models.spec import DataSpec
from .bn_stats import bn_layers, bn_statistics_losses, capture_bn_inputs, input_prior_losses, reached_bn_layers
from .common import (
    LOG_EVERY,
    CheckpointClock,
    DevicePlateau,
    Progress,
    StageMonitor,
    batch_seed,
    check_model_dtype,
    cpu_generator,
    frozen_eval,
    latent_state,
    load_latent_state,
    model_device,
    plateau_adam,
    probe_forward,
)
from .generator import GenieGenerator, grouped_forward
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
    with torch.random.fork_rng(devices=[]):  # the layers' init draws from the CPU generator: restored after
        # that generator alone: torch.manual_seed would also reseed every CUDA device, which fork_rng(devices=[])
        # does not restore (the caller's CUDA random stream would change)
        torch.default_generator.manual_seed(batch_seed(seed, index, "genie-g"))
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


def finished_images(images: Tensor) -> Tensor:
    """A CPU float copy in the standard layout, whatever the generator's (channels_last on CPU), so that what
    consumes a set (calibration, saving) sees the same tensors as before that layout."""
    return images.detach().float().cpu().clone(memory_format=torch.contiguous_format)


def to_batch(index: int, gen: nn.Module, z: Tensor, images: Tensor) -> GenieBatch:
    state = {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()}
    return GenieBatch(index, state, z.detach().cpu().clone(), finished_images(images))


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


def _new_group(spec: DataSpec, cfg: GenConfig, seed: int, indices: Sequence[int], size: int,
               device: torch.device) -> tuple[list[GenieGenerator], list[Tensor], list, list[DevicePlateau]]:
    """Per batch, today's generator, latents and optimizers (per-batch Adam states and plateau lrs)."""
    gens, zs, opts, plateaus = [], [], [], []
    for b in indices:
        gen, z = init_batch(spec, cfg, seed, b, size, device)
        opt_z, plateau = plateau_adam([z], cfg.lr_z, device, patience=cfg.plateau_patience, min_lr=cfg.min_lr_z)
        plateaus.append(plateau)
        opts.append((opt_z, torch.optim.Adam(gen.parameters(), lr=cfg.lr_g)))
        gens.append(gen)
        zs.append(z)
    return gens, zs, opts, plateaus


@dataclass
class _Hooks:
    on_log: GenieInspector | None = None
    on_state: Callable[[dict], None] | None = None  # receives a group's mid-stage state (see group_state)
    clock: CheckpointClock = field(default_factory=CheckpointClock)
    resume: dict | None = None  # a state from on_state: its group continues from that iteration


def group_state(indices: Sequence[int], it: int, gens: list[GenieGenerator], zs: list[Tensor], opts: list,
                plateaus: list[DevicePlateau], rngs: list[torch.Generator], rng_key: str = "swing") -> dict:
    """Everything a group of batches needs to continue exactly after `it` iterations, each batch's random
    generator (Genie-D's swing offsets, SADAG's neighbor noise) under `rng_key`: CPU tensors and plain values."""
    per_batch = [{**latent_state(gen, z, opt_z, opt_g, p), rng_key: g.get_state()}
                 for gen, z, (opt_z, opt_g), p, g in zip(gens, zs, opts, plateaus, rngs, strict=True)]
    return {"batches": list(indices), "iteration": it, "per_batch": per_batch}


def load_group_state(state: dict, gens: list[GenieGenerator], zs: list[Tensor], opts: list,
                     plateaus: list[DevicePlateau], rngs: list[torch.Generator], rng_key: str = "swing") -> int:
    """Restore :func:`group_state` in place; returns the iteration to continue from."""
    for s, gen, z, (opt_z, opt_g), p, g in zip(state["per_batch"], gens, zs, opts, plateaus, rngs, strict=True):
        load_latent_state(s, gen, z, opt_z, opt_g, p)
        g.set_state(s[rng_key])
    return int(state["iteration"])


def _genie_group(net: nn.Module, layers: list[nn.BatchNorm2d], captured: list, offsets: list[torch.Generator],
                 spec: DataSpec, cfg: GenConfig, seed: int, indices: Sequence[int], size: int,
                 monitor: StageMonitor, hooks: _Hooks) -> list[GenieBatch]:
    """Genie-D on batches of equal size in one pass: their images concatenated through the model.

    The loss is the sum of the batches' losses, so each batch's gradients, optimizer steps, plateau
    lr and swing offsets (its own generator, from its own seed) are those of the batch run alone.
    With cfg.bn_scope "set" (DGH) the BN loss is one, of the moments over all the group's images (the
    whole set); it counts `count` times in the objective so that each batch's share of its gradient keeps
    the weight of a per-batch loss against its input prior, and each batch's plateau sees it plus its prior.
    """
    gens, zs, opts, plateaus = _new_group(spec, cfg, seed, indices, size, model_device(net))
    offsets[:] = [cpu_generator(batch_seed(seed, b, "swing")) for b in indices]
    count, iters, x, first = len(indices), cfg.genie_iters, None, 0
    if hooks.resume is not None and hooks.resume["batches"] == list(indices):
        first = load_group_state(hooks.resume, gens, zs, opts, plateaus, offsets)
    for it in range(first, iters):
        for opt_z, opt_g in opts:
            opt_z.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
        x = gens[0](zs[0]) if count == 1 else grouped_forward(gens, torch.stack(zs))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            net(x)
        prior = input_prior_losses(x, count)
        if cfg.bn_scope == "set":
            shared = bn_statistics_losses(captured, layers, 1)
            losses = shared + prior
            (shared.sum() * count + prior.sum()).backward()
        else:
            losses = bn_statistics_losses(captured, layers, count) + prior
            losses.sum().backward()
        for (opt_z, opt_g), plateau, loss in zip(opts, plateaus, losses, strict=True):
            opt_z.step()
            opt_g.step()
            plateau.step(loss)
            if (it + 1) % cfg.g_decay_every == 0:  # Genie's ExponentialLR stepped every 100 iterations
                opt_g.param_groups[0]["lr"] = cfg.lr_g * cfg.g_decay ** ((it + 1) // cfg.g_decay_every)
        monitor.observe(losses.sum())
        if monitor.due(it, iters):
            metrics = [{"loss": losses[k], "lr_z": plateaus[k].lr} for k in range(count)]
            monitor.report_group(indices, it, iters, metrics)
            _inspect_group(indices, it, gens, zs, x, hooks.on_log)
        if hooks.on_state is not None and hooks.clock.due(it + 1, iters):
            hooks.clock.save(lambda done: hooks.on_state(group_state(indices, done, gens, zs, opts, plateaus, offsets)),
                             it + 1)
    if x is None:
        with torch.no_grad():
            x = torch.cat([gen(z) for gen, z in zip(gens, zs, strict=True)])
    monitor.check(indices[-1], max(iters - 1, 0))
    return [to_batch(b, gen, z, images)
            for b, gen, z, images in zip(indices, gens, zs, x.chunk(count), strict=True)]


def _inspect_group(indices: Sequence[int], it: int, gens: list[GenieGenerator], zs: list[Tensor], x: Tensor,
                   on_log: GenieInspector | None) -> None:
    if on_log is None:
        return
    for k, (b, images) in enumerate(zip(indices, x.detach().chunk(len(indices)), strict=True)):
        on_log(b, it, gens[k], zs[k].detach(), images)


def batch_groups(sizes: Sequence[int] | Mapping[int, int], parallel: int, done: Collection[int],
                 only: Sequence[int] | None = None) -> list[list[int]]:
    """The groups still to do, each of `parallel` consecutive batches of equal size.

    Groups are cut from all batches (or all of `only`: this rank's share), done or not, so a run resumed
    after a kill repeats the groups of the original run (and its floats). A group is done only when all of its
    batches are: a kill between the checkpoints of one group's batches leaves it to be made again whole, since
    its batches were optimized together (one pass, and with bn_scope "set" one objective).
    """
    out: list[list[int]] = []
    for b in range(len(sizes)) if only is None else only:
        if out and len(out[-1]) < parallel and sizes[out[-1][0]] == sizes[b]:
            out[-1].append(b)
        else:
            out.append([b])
    return [group for group in out if not all(b in done for b in group)]


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
    on_state: Callable[[dict], None] | None = None,
    state_every: int = 500,
    state_seconds: float = 0.0,
    resume_state: dict | None = None,
    only: Sequence[int] | None = None,
) -> list[GenieBatch]:
    """Genie-D (docs/method.md section 2) for every batch not already in `done`, in batch order.

    The model is used frozen and in eval mode (its flags are restored after); with cfg.swing the BN
    loss is taken through a swing-conv copy. `on_batch` receives each newly finished batch; `on_log`
    (diagnostics, e.g. benchmarks/genie_collapse.py) sees the generator, z and images at every log point.
    Up to cfg.parallel_batches batches of equal size run in one pass (0: all that fit in memory) with the
    same math as one by one; a group finishes, and reaches `on_batch`, together. Within a group,
    `on_state` receives every `state_every` iterations (and with `state_seconds` no more often than
    CheckpointClock allows) a dict of tensors and plain values (group_state);
    passing the last one back as `resume_state` (with the batches finished before it in `done`)
    continues that group exactly where it was. `only`: the batches to make and return (another process
    makes the others; torchrun's ranks split them), all by default.
    """
    cfg.validate()
    bn_layers(model)  # fail early, with the actionable message, on a model without BN
    check_model_dtype(model)
    sizes = batch_sizes(cfg.num_images, cfg.batch_size)
    done = dict(done or {})
    _check_done(done, sizes)
    monitor = StageMonitor("genie-d", len(sizes) * cfg.genie_iters, progress, log, _HINT, log_every)
    finished = dict(done)
    with frozen_eval(model), torch.enable_grad():
        offsets: list[torch.Generator] = [torch.Generator()]
        net = swing_model(model, offsets) if cfg.swing else model
        layers = reached_bn_layers(net, spec.input_size)
        hooks = _Hooks(on_log, on_state, CheckpointClock(state_every, state_seconds), resume_state)
        parallel = _parallel(model, spec, cfg, sizes, only)
        with capture_bn_inputs(net, layers) as captured:
            for group in batch_groups(sizes, parallel, done, only):
                batches = _genie_group(net, layers, captured, offsets, spec, cfg, seed, group, sizes[group[0]],
                                       monitor, hooks)
                for batch in batches:
                    log.info("genie-d: batch %d/%d done (%d images)", batch.index + 1, len(sizes), sizes[batch.index])
                    finished[batch.index] = batch
                    if on_batch is not None:
                        on_batch(batch)
    return [finished[b] for b in (range(len(sizes)) if only is None else only)]


def _parallel(model: nn.Module, spec: DataSpec, cfg: GenConfig, sizes: Sequence[int],
              only: Sequence[int] | None) -> int:
    if cfg.bn_scope != "set":
        return cfg.parallel_batches or auto_parallel_batches(model, spec, cfg.batch_size, len(sizes))
    check_bn_scope(cfg)
    if only is not None and len(only) < len(sizes):
        raise ConfigError("gen.bn_scope 'set' matches statistics over the whole set: it cannot make a subset of the "
                          "batches (`only`)")
    return len(sizes)


def _activation_floats(model: nn.Module, spec: DataSpec) -> int:
    """Floats of every module output for one image (a no-grad probe), plus the generator's analytically."""
    total = 0

    def hook(_m: nn.Module, _i: tuple, out: Tensor) -> None:
        nonlocal total
        total += out.numel() if isinstance(out, Tensor) else 0

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        probe_forward(model, spec.input_size)
    finally:
        for h in handles:
            h.remove()
    s = spec.input_size
    return total + 128 * (2 * (s // 4) ** 2 + (s // 2) ** 2) + 64 * (3 * (s // 2) ** 2 + s ** 2) + 9 * s ** 2


def _memory_bytes(device: torch.device) -> int:
    # total, not free, memory: the grouping (and so the exact floats) must be the same when a run resumes
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_parallel_batches(model: nn.Module, spec: DataSpec, batch_size: int, count: int) -> int:
    """How many batches to optimize in one pass when gen.parallel_batches is 0.

    On CPU one: convolutions there are compute-bound at batch 128 (one pass of 2 batches measured about
    1.15x faster on 2 cores), and one by one keeps every batch bitwise independent of its neighbours.
    On accelerators, where small steps are launch-bound, all that fit in a quarter of the device memory at
    4 floats of 4 bytes per activation (forward value, saved copy, gradient, slack).
    """
    device = model_device(model)
    if count <= 1 or device.type == "cpu":
        return 1
    per_batch = 16 * _activation_floats(model, spec) * batch_size
    fits = _memory_bytes(device) // 4 // max(per_batch, 1)
    return int(max(1, min(count, fits)))
