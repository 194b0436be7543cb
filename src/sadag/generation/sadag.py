"""SADAG stage C: sharpness-aware refinement of Genie-D batches (docs/method.md section 4)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GenConfig
from ..errors import ConfigError, ModelError
from ..models.spec import DataSpec
from .bn_stats import bn_statistics_losses, capture_bn_inputs, input_prior_losses, reached_bn_layers, shown_names
from .common import (
    LOG_EVERY,
    CheckpointClock,
    DevicePlateau,
    Progress,
    StageMonitor,
    batch_seed,
    check_model_dtype,
    frozen_eval,
    model_device,
    plateau_adam,
    probe_forward,
)
from .generator import GenieGenerator, grouped_forward
from .genie import GenieBatch, batch_groups, finished_images, group_state, load_batch_generator, load_group_state

log = logging.getLogger(__name__)

_HINT = "lower gen.refine_lr_z / gen.refine_lr_g or check the FP and quantized models' outputs"


def gradient_cosine(e_a: Tensor, h_a: Tensor, e_b: Tensor, h_b: Tensor, *, pairwise: bool = True) -> Tensor:
    """Cosine between per-sample gradients e (x) h of 1/2 ||e||^2 w.r.t. a linear layer's weight.

    cos(e_a (x) h_a, e_b (x) h_b) = cos(e_a, e_b) * cos(h_a, h_b). pairwise: (Na, Nb) matrix;
    otherwise row i against row i, shape (N,).
    """
    ea, eb = F.normalize(e_a.flatten(1), dim=1), F.normalize(e_b.flatten(1), dim=1)
    ha, hb = F.normalize(h_a.flatten(1), dim=1), F.normalize(h_b.flatten(1), dim=1)
    if pairwise:
        return (ea @ eb.T) * (ha @ hb.T)
    return (ea * eb).sum(1) * (ha * hb).sum(1)


def gradient_matching_losses(e: Tensor, h: Tensor, e_n: Tensor, h_n: Tensor, groups: int = 1) -> Tensor:
    """L_GM = 1 - mean_i cos(g_i, g'_i) between each sample and its neighbor, per batch of `groups` equal
    batches concatenated along N: shape (groups,)."""
    return 1.0 - gradient_cosine(e, h, e_n, h_n, pairwise=False).view(groups, -1).mean(1)


def gradient_matching_loss(e: Tensor, h: Tensor, e_n: Tensor, h_n: Tensor) -> Tensor:
    """L_GM of one batch (a scalar): see gradient_matching_losses."""
    return gradient_matching_losses(e, h, e_n, h_n).sum()


def diversity_losses(e: Tensor, h: Tensor, pool_e: Tensor | None, pool_h: Tensor | None, zeta: float,
                     groups: int = 1) -> Tensor:
    """L_D = mean_i max_{j != i} relu(|cos(g_i, g_j)| - zeta) per batch of `groups` equal batches concatenated
    along N (shape (groups,)); j runs over all of e's rows (every batch of the group) and the pool.

    As in the SADAG code, the gradient flows through the rows only; the columns are detached.
    """
    cols_e, cols_h = e.detach(), h.detach()
    if pool_e is not None and pool_h is not None and pool_e.shape[0] > 0:
        cols_e, cols_h = torch.cat([cols_e, pool_e]), torch.cat([cols_h, pool_h])
    sim = torch.relu(gradient_cosine(e, h, cols_e, cols_h).abs() - zeta)
    mask = torch.ones_like(sim)
    mask[:, : e.shape[0]].fill_diagonal_(0.0)
    return (sim * mask).max(dim=1).values.view(groups, -1).mean(1)


def diversity_loss(e: Tensor, h: Tensor, pool_e: Tensor | None, pool_h: Tensor | None, zeta: float) -> Tensor:
    """L_D of one batch against the pool (a scalar): see diversity_losses."""
    return diversity_losses(e, h, pool_e, pool_h, zeta).sum()


def last_linear(model: nn.Module, input_size: int) -> nn.Linear:
    """The last nn.Linear that the eval-mode forward pass calls (SADAG's h is its input), found by one no-grad probe
    of one zero image of `input_size` pixels, as reached_bn_layers does. Not the last in module order: a classifier
    declared before an SE block's Linear layers, or a training-only head declared after it, comes last there."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear layer: SADAG needs the classifier's last linear layer "
            "to form per-sample gradients; use --method genie for this model"
        )
    called: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, _args: called.append(mod)) for m in linears]
    try:
        probe_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()
    if not called:
        names = shown_names([n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
        raise ModelError(
            f"{type(model).__name__}: the eval-mode forward pass calls none of its nn.Linear layers ({names}): SADAG "
            "needs the classifier's last linear layer to form per-sample gradients; use --method genie for this model"
        )
    return called[-1]


@contextlib.contextmanager
def capture_linear_input(layer: nn.Module) -> Iterator[list[Tensor | None]]:
    """Slot 0 holds the latest input of `layer`, seen by a pre-hook (before any input quantizer)."""
    slot: list[Tensor | None] = [None]

    def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        slot[0] = args[0]

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield slot
    finally:
        handle.remove()


@dataclass
class _Nets:
    """The frozen models and the hook slots the refinement reads."""

    fp: nn.Module
    q: nn.Module
    bn: list[nn.BatchNorm2d]
    bn_inputs: list[Tensor | None]
    h_slot: list[Tensor | None]

    def forward(self, x: Tensor, bn_images: Tensor | None = None, groups: int = 1
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """e = f_FP(x) - f_Q(x), h (the Q model's last linear input, flattened) and, given bn_images
        = x[:n], L_BN plus Genie's input prior (the SADAG code's BN loss has it) of each of `groups` equal
        batches in those n samples: shape (groups,).

        L_BN is taken right after the FP forward, before the Q model could re-trigger shared hooks.
        """
        fp_out = self.fp(x)
        bn = None
        if bn_images is not None:
            n = bn_images.shape[0]
            rows = [a[:n] if a is not None else None for a in self.bn_inputs]
            bn = bn_statistics_losses(rows, self.bn, groups) + input_prior_losses(bn_images, groups)
        self.h_slot[0] = None  # a forward that skips the layer must not reuse the previous input
        q_out = self.q(x)
        h = self.h_slot[0]
        if h is None:
            raise ModelError(f"{type(self.q).__name__}: this forward pass did not call the last nn.Linear layer that "
                             "the probe found (its input is SADAG's h): SADAG needs a forward that runs the same "
                             "layers for every input; use --method genie for this model")
        return fp_out - q_out, h.flatten(1), bn


@dataclass
class _Latents:
    """What a neighbor needs of the batches refined together: `images`, their generators as one function of
    the latents z ((B, latent) for one batch, (G, B, latent) for G), and each batch's seeded noise."""

    images: Callable[[Tensor], Tensor]
    z: Tensor
    noise: list[torch.Generator]

    @property
    def groups(self) -> int:
        return len(self.noise)

    def randn(self, shape: torch.Size) -> Tensor:
        """Gaussian noise whose leading dimension is split equally among the batches, each part drawn from its
        batch's generator (so a batch draws what it would alone)."""
        part = (shape[0] // self.groups, *shape[1:])
        draws = [torch.randn(part, generator=g, device=self.z.device, dtype=self.z.dtype) for g in self.noise]
        return draws[0] if len(draws) == 1 else torch.cat(draws)


# Neighbor directions (ALGORITHM.md section 3). Each returns (x, L_BN, e, h, e', h') with x' = G(z - rho d/||d||)
# per sample; d is detached (no gradient flows through the choice of neighbor) and its randomness comes from
# the batches' seeded generators.

def _unit_outputs(e: Tensor, h: Tensor) -> Tensor:
    """(e/||e||, h/||h||) per sample: the gradient cosine cos(e, e') cos(h, h') sees nothing else."""
    return torch.cat([F.normalize(e, dim=1), F.normalize(h, dim=1)], dim=1)


def _vjp(u: Tensor, z: Tensor, r: Tensor) -> Tensor:
    """J^T r, J = du/dz; the graph is kept for the loss's backward."""
    (g,) = torch.autograd.grad(u, z, grad_outputs=r, retain_graph=True)
    return g


def _jvp(u: Tensor, z: Tensor, v: Tensor) -> Tensor:
    """J v by the double-backward trick: J^T w is linear in w, and its gradient with respect to w along v is J v.
    (Reverse mode only: the quantizers' custom backward has no forward-mode rule.)"""
    w = torch.zeros_like(u, requires_grad=True)
    (g,) = torch.autograd.grad(u, z, grad_outputs=w, create_graph=True)
    (jv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)
    return jv


def _step_to(nets: _Nets, lat: _Latents, rho: float, d: Tensor, x: Tensor, bn: Tensor | None, e: Tensor,
             h: Tensor):
    x_n = lat.images(lat.z - rho * F.normalize(d.detach(), dim=-1))
    e_n, h_n, _ = nets.forward(x_n)
    return x, bn, e, h, e_n, h_n


def _random_pair(nets: _Nets, lat: _Latents, rho: float):
    """Neighbor along a seeded isotropic unit direction in z; x and x' go through the models as one batch.

    The generator runs on z and z' separately: its BN uses batch statistics, so one call would change the images.
    """
    d = lat.randn(lat.z.shape)
    x = lat.images(lat.z)
    x_n = lat.images(lat.z - rho * F.normalize(d, dim=-1))
    e2, h2, bn = nets.forward(torch.cat([x, x_n]), bn_images=x, groups=lat.groups)
    n = x.shape[0]
    return x, bn, e2[:n], h2[:n], e2[n:], h2[n:]


def _released_pair(nets: _Nets, lat: _Latents, rho: float):
    """Neighbor along d = J^T r: seeded Gaussian noise r on the unit outputs (e/||e||, h/||h||), back-propagated
    through the models and the generator to z (one extra backward).

    What the authors' released configuration does in effect: its direction is the gradient of the
    self-similarity mean_i (u_i . sg(u_i) + 1e-9) with u the normalized logit difference and feature, which is
    zero in exact arithmetic (normalization's Jacobian is orthogonal to u); what remains is float rounding noise
    at u, carried back to z by J^T. So d lies along the directions of z that move the outputs.
    """
    x = lat.images(lat.z)
    e, h, bn = nets.forward(x, bn_images=x, groups=lat.groups)
    u = _unit_outputs(e, h)
    return _step_to(nets, lat, rho, _vjp(u, lat.z, lat.randn(u.shape)), x, bn, e, h)


ADVERSARIAL_POWER_STEPS = 2  # power-iteration steps from the released direction toward the top eigenvector


def _adversarial_pair(nets: _Nets, lat: _Latents, rho: float):
    """Neighbor that, to leading order, most lowers the gradient cosine cos(e, e') cos(h, h') (what the paper
    describes, under the loss actually optimized).

    The cosine's gradient at z' = z is zero (a maximum), so the leading term is second order: with the unit
    outputs u = (e/||e||, h/||h||) linearized, 1 - cos(e, e') cos(h, h') ~ 1/2 ||J delta||^2, J = du/dz.
    The least-similar direction is the top eigenvector of J^T J, found by a few power-iteration steps
    d <- J^T J d (each: one double backward for J d, one backward for J^T), normalized per sample, starting
    from the released direction J^T r. Each step costs about three backward passes.
    """
    x = lat.images(lat.z)
    e, h, bn = nets.forward(x, bn_images=x, groups=lat.groups)
    u = _unit_outputs(e, h)
    d = _vjp(u, lat.z, lat.randn(u.shape))
    for _ in range(ADVERSARIAL_POWER_STEPS):
        d = _vjp(u, lat.z, _jvp(u, lat.z, F.normalize(d, dim=-1)).detach())
    return _step_to(nets, lat, rho, d, x, bn, e, h)


_PAIRS = {"released": _released_pair, "random": _random_pair, "adversarial": _adversarial_pair}


def _no_neighbor(nets: _Nets, lat: _Latents, rho: float):
    """lambda_gm = 0 (the diversity-only ablation): L_GM has no weight, so no neighbor is formed; the loss and
    its gradient are those of any pair, at about a third of the cost of a released-neighbor step."""
    x = lat.images(lat.z)
    e, h, bn = nets.forward(x, bn_images=x, groups=lat.groups)
    return x, bn, e, h, None, None


def _pair_for(cfg: GenConfig) -> Callable:
    return _PAIRS[cfg.neighbor] if cfg.lambda_gm != 0 else _no_neighbor


@dataclass
class _Pool:
    e: Tensor | None = None
    h: Tensor | None = None

    def add(self, e: Tensor, h: Tensor) -> None:
        e, h = e.detach(), h.detach()
        self.e = e if self.e is None else torch.cat([self.e, e])
        self.h = h if self.h is None else torch.cat([self.h, h])


@dataclass
class RefineCheckpoints:
    """Mid-batch checkpoints: ``save`` receives the state of the batches in progress every ``every`` steps, no more
    often than :class:`CheckpointClock` allows with ``seconds`` (CPU tensors and plain values); passing the last
    one back as ``resume`` continues those batches exactly where they were."""

    save: Callable[[dict], None] | None = None
    every: int = 50
    resume: dict | None = None
    seconds: float = 0.0


@dataclass
class _Group:
    """Batches refined in one pass (gen.refine_parallel), each with its own generator, latents, optimizers,
    plateau lr and noise, as it would have alone."""

    indices: list[int]
    gens: list[GenieGenerator] = field(default_factory=list)
    zs: list[Tensor] = field(default_factory=list)
    opts: list[tuple[torch.optim.Optimizer, torch.optim.Optimizer]] = field(default_factory=list)
    plateaus: list[DevicePlateau] = field(default_factory=list)
    noise: list[torch.Generator] = field(default_factory=list)

    @classmethod
    def start(cls, batches: list[GenieBatch], spec: DataSpec, cfg: GenConfig, seed: int,
              device: torch.device) -> _Group:
        group = cls([b.index for b in batches])
        for batch in batches:
            gen, z = load_batch_generator(batch, spec, cfg, device)
            opt_z, plateau = plateau_adam([z], cfg.refine_lr_z, device, patience=cfg.plateau_patience,
                                          min_lr=cfg.refine_min_lr_z)
            group.plateaus.append(plateau)
            group.opts.append((opt_z, torch.optim.Adam(gen.parameters(), lr=cfg.refine_lr_g)))
            noise = torch.Generator(device=device)
            noise.manual_seed(batch_seed(seed, batch.index, "sadag"))
            group.gens.append(gen)
            group.zs.append(z)
            group.noise.append(noise)
        return group

    def latents(self) -> _Latents:
        if len(self.gens) == 1:  # one batch: its generator called directly, the floats of a lone batch
            return _Latents(self.gens[0], self.zs[0], self.noise)
        return _Latents(lambda z: grouped_forward(self.gens, z), torch.stack(self.zs), self.noise)

    def state(self, iteration: int) -> dict:
        """Everything the group needs to continue exactly after `iteration` steps."""
        return group_state(self.indices, iteration, self.gens, self.zs, self.opts, self.plateaus, self.noise,
                           "noise")

    def load(self, state: dict) -> int:
        return load_group_state(state, self.gens, self.zs, self.opts, self.plateaus, self.noise, "noise")


def _as_group_state(state: dict | None) -> dict | None:
    """A mid-stage checkpoint as a group's state; one saved before groups existed (sadag before 2026-12-01,
    one batch, its keys at the top level) becomes the state of that batch alone."""
    if state is None or "batches" in state:
        return state
    return {"batches": [state["batch"]], "iteration": state["iteration"], "per_batch": [state]}


def _refine_group(nets: _Nets, batches: list[GenieBatch], pool: _Pool, spec: DataSpec, cfg: GenConfig, seed: int,
                  monitor: StageMonitor, checkpoints: RefineCheckpoints, clock: CheckpointClock
                  ) -> tuple[list[Tensor], Tensor, Tensor]:
    """The refined images of each batch, and the group's e and h for the diversity pool of later batches.

    The loss is the sum of the batches' losses, so each batch's gradient, optimizer steps and plateau are those
    of the batch alone but for its diversity term, whose columns hold every batch of the group at its current
    step (the earlier batches' finished samples, in the pool, too).
    """
    device = model_device(nets.fp)
    group = _Group.start(batches, spec, cfg, seed, device)
    pair, iters, count, first = _pair_for(cfg), cfg.refine_iters, len(batches), 0
    resume = _as_group_state(checkpoints.resume)
    if resume is not None and resume["batches"] == group.indices:
        first = group.load(resume)
    x = e = h = None
    for it in range(first, iters):
        for opt_z, opt_g in group.opts:
            opt_z.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
        x, bn, e, h, e_n, h_n = pair(nets, group.latents(), cfg.rho)
        div = diversity_losses(e, h, pool.e, pool.h, cfg.zeta, count)
        if e_n is None:  # no neighbor, no L_GM
            terms = {"bn": bn, "div": div}
            losses = bn + cfg.lambda_div * div
        else:
            gm = gradient_matching_losses(e, h, e_n, h_n, count)
            terms = {"bn": bn, "gm": gm, "div": div}
            losses = bn + cfg.lambda_gm * gm + cfg.lambda_div * div
        losses.sum().backward()
        for (opt_z, opt_g), plateau, loss in zip(group.opts, group.plateaus, losses, strict=True):
            opt_z.step()
            opt_g.step()
            plateau.step(loss)
            opt_g.param_groups[0]["lr"] = cfg.refine_lr_g * cfg.refine_g_decay ** (it + 1)
        monitor.observe(losses.sum())
        if monitor.due(it, iters):
            monitor.report_group(group.indices, it, iters, [{"loss": losses[k], **{n: t[k] for n, t in terms.items()},
                                                             "lr_z": group.plateaus[k].lr} for k in range(count)])
        if checkpoints.save is not None and clock.due(it + 1, iters):
            clock.save(lambda done: checkpoints.save(group.state(done)), it + 1)
    monitor.check(group.indices[-1], max(iters - 1, 0))
    if x is None or e is None or h is None:  # zero iterations: the warm-up images unchanged
        x = torch.cat([b.images for b in batches]).to(device)
        e, h = _outputs(nets, x, cfg.batch_size)
    return [finished_images(part) for part in x.chunk(count)], e.detach(), h.detach()


def _finished_batch(nets: _Nets, entry: Tensor | dict[str, Tensor], device: torch.device,
                    chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """A batch refined before a resume: its images and pool entry as saved; from a checkpoint that holds only
    images (sadag before 2026-12-01) e and h are recomputed, equal to the saved ones within float rounding."""
    if isinstance(entry, Tensor):
        images = entry.float().cpu()
        return images, *_outputs(nets, images.to(device), chunk)
    return entry["images"].float().cpu(), entry["e"].to(device), entry["h"].to(device)


@torch.no_grad()
def _outputs(nets: _Nets, images: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """e and h of finished images (the diversity pool of a checkpoint that did not save them)."""
    es, hs = [], []
    for part in images.split(max(1, chunk)):
        e, h, _ = nets.forward(part)
        es.append(e)
        hs.append(h)
    return torch.cat(es), torch.cat(hs)


def _check_inputs(batches: list[GenieBatch], done: dict[int, Tensor | dict[str, Tensor]]) -> list[GenieBatch]:
    ordered = sorted(batches, key=lambda b: b.index)
    if len({b.index for b in ordered}) != len(ordered):
        raise ConfigError("SADAG refinement got two Genie batches with the same index")
    sizes = {b.index: b.images.shape for b in ordered}
    for i, entry in done.items():
        images = entry if isinstance(entry, Tensor) else entry.get("images") if isinstance(entry, dict) else None
        pool_rows = {len(entry.get(k, ())) for k in ("e", "h")} if isinstance(entry, dict) else set()
        if not isinstance(images, Tensor) or (isinstance(entry, dict) and pool_rows != {len(images)}):
            raise ConfigError(f"checkpointed SADAG batch {i} is not a refined batch (images with their e and h "
                              "rows); delete that checkpoint")
        if i not in sizes or images.shape != sizes[i]:
            raise ConfigError(
                f"checkpointed SADAG batch {i} (shape {tuple(images.shape)}) does not match the Genie batches; "
                "delete the refinement checkpoint or restore the original settings"
            )
    return ordered


def refine_sadag(
    fp_model: nn.Module,
    q_model: nn.Module,
    batches: list[GenieBatch],
    spec: DataSpec,
    cfg: GenConfig,
    seed: int,
    *,
    done: dict[int, Tensor | dict[str, Tensor]] | None = None,
    on_batch: Callable[[int, dict[str, Tensor]], None] | None = None,
    progress: Progress | None = None,
    log_every: int = LOG_EVERY,
    checkpoints: RefineCheckpoints | None = None,
) -> Tensor:
    """Refine each Genie batch from its generator state and latents; returns (N, 3, S, S) float32 CPU.

    Batches are refined in index order, cfg.refine_parallel at a time (1: one by one, as the paper); the
    diversity term of a batch compares against the finished samples of the earlier batches and, in a pass of
    several, the other batches of its pass at their current step. Both models are used frozen and in eval mode;
    their flags are restored afterwards.
    `on_batch` receives each newly refined batch as {"images", "e", "h"} (CPU; e and h: its diversity-pool
    entry); passed back in `done`, those batches are not refined again and a resumed run equals an unbroken
    one bit for bit. `checkpoints` saves and resumes the batch in progress.
    """
    cfg.validate()
    for model in (fp_model, q_model):  # the generators' images are in torch's default dtype
        check_model_dtype(model)
    done = dict(done or {})
    ordered = _check_inputs(batches, done)
    layers = reached_bn_layers(fp_model, spec.input_size)
    device = model_device(fp_model)
    iters = cfg.refine_iters
    monitor = StageMonitor("sadag refine", len(ordered) * iters, progress, log, _HINT, log_every)
    checkpoints = checkpoints or RefineCheckpoints()
    clock = CheckpointClock(checkpoints.every, checkpoints.seconds)
    pool, out = _Pool(), []
    with (frozen_eval(fp_model, q_model), torch.enable_grad(), capture_bn_inputs(fp_model, layers) as bn_inputs,
          capture_linear_input(last_linear(q_model, spec.input_size)) as h_slot):
        nets = _Nets(fp_model, q_model, layers, bn_inputs, h_slot)
        for group in _groups(ordered, cfg.refine_parallel):
            if all(b.index in done for b in group):
                for batch in group:
                    images, e, h = _finished_batch(nets, done[batch.index], device, cfg.batch_size)
                    pool.add(e, h)
                    out.append(images)
                continue
            refined, e, h = _refine_group(nets, group, pool, spec, cfg, seed, monitor, checkpoints, clock)
            for batch, images, e_b, h_b in zip(group, refined, e.chunk(len(group)), h.chunk(len(group)),
                                               strict=True):
                log.info("sadag: batch %d refined (%d images)", batch.index, images.shape[0])
                if on_batch is not None:
                    on_batch(batch.index, {"images": images, "e": e_b.cpu(), "h": h_b.cpu()})
            pool.add(e, h)
            out.extend(refined)
    return torch.cat(out)


def _groups(ordered: list[GenieBatch], parallel: int) -> list[list[GenieBatch]]:
    """The batches in passes of `parallel` consecutive ones of equal size, cut the same whatever a resumed run
    finds done (a pass is refined again whole unless all of its batches are)."""
    by_index = {b.index: b for b in ordered}
    cuts = batch_groups({b.index: b.images.shape[0] for b in ordered}, parallel, (), only=list(by_index))
    return [[by_index[i] for i in cut] for cut in cuts]
