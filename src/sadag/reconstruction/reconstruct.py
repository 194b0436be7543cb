"""reconstruct_(): calibrate a quantized model unit by unit (Genie-M / BRECQ / QDrop)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import CalibConfig
from ..errors import NumericalError
from ..quantization.modules import is_quant_layer
from ..quantization.prepare import float_copy, freeze_
from ..quantization.quantizers import ActQuantizer
from .cache import capture_unit_io
from .losses import BetaSchedule, reconstruction_loss

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict[str, float]], None]
LOG_EVERY = 100


def reconstruct_(
    qmodel: nn.Module,
    images: Tensor,
    cfg: CalibConfig,
    seed: int = 0,
    *,
    start_unit: int = 0,
    on_unit: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    label: str = "calibrate",
) -> nn.Module:
    """Calibrate ``qmodel`` (from :func:`sadag.quantize`) in place on calibration images.

    Args:
        qmodel: the fake-quantized model; its FP twin (the reconstruction target) is derived from it.
        images: (N, 3, H, W) calibration images, normalised as the model expects, on the model's device.
        cfg: iterations, minibatch size, learning rates, QDrop probability.
        seed: makes the minibatch sampling and QDrop masks reproducible, unit by unit.
        start_unit: skip units already calibrated (resume).
        on_unit: called with the unit index after each unit is done (checkpoint there).
        progress: called as progress(stage, step, total, metrics) every few hundred iterations.
        label: the stage name shown in progress and logs (e.g. "warm-up calibrate" for SADAG's stage B).
    """
    cfg.validate()
    fp_model = float_copy(qmodel)
    units = qmodel.sadag_plan.units
    modules = dict(qmodel.named_modules())
    for k, unit in enumerate(units):
        if k < start_unit:
            continue
        torch.manual_seed(seed * 10_007 + k)
        fp_in, fp_out = capture_unit_io(fp_model, unit, images, cfg.batch_size)
        q_in, _ = capture_unit_io(qmodel, unit, images, cfg.batch_size, want_output=False)
        stage = f"{label} unit {k + 1}/{len(units)} ({unit})"
        calibrate_unit_(modules[unit], fp_in, q_in, fp_out, cfg, seed * 10_007 + k, stage, progress)
        if on_unit is not None:
            on_unit(k)
    return freeze_(qmodel)


def _unit_parts(unit: nn.Module) -> tuple[list[nn.Module], list[ActQuantizer]]:
    layers = [m for m in unit.modules() if is_quant_layer(m)]
    acts = [m for m in unit.modules() if isinstance(m, ActQuantizer) and m.bits is not None and m.active]
    return layers, acts


@torch.no_grad()
def _init_act_quantizers(unit: nn.Module, acts: list[ActQuantizer], x: Tensor) -> None:
    """Clip-search init of the unit's activation quantizers on its first quantized-input minibatch."""
    for a in acts:
        a.observing = True
    try:
        unit(x)
    finally:
        for a in acts:
            a.observing = False


def calibrate_unit_(
    unit: nn.Module,
    fp_in: Tensor,
    q_in: Tensor,
    fp_out: Tensor,
    cfg: CalibConfig,
    seed: int,
    stage: str = "calibrate",
    progress: Progress | None = None,
) -> None:
    """AdaRound + learned step sizes on one unit, with QDrop's input mixing and quantizer dropping."""
    layers, acts = _unit_parts(unit)
    n, bs = q_in.shape[0], min(cfg.batch_size, q_in.shape[0])
    _init_act_quantizers(unit, acts, q_in[:bs])
    for layer in layers:
        layer.weight_quantizer.start_adaround(layer.weight)
    rounding = [layer.weight_quantizer for layer in layers]
    groups = [{"params": [w.alpha for w in rounding], "lr": cfg.lr_round}]
    if cfg.lr_w_scale > 0:
        groups.append({"params": [w.scale for w in rounding], "lr": cfg.lr_w_scale})
    trainable = [p for g in groups for p in g["params"]] + [a.scale for a in acts]
    for p in trainable:
        p.requires_grad_(True)
    opt_w = torch.optim.Adam(groups)
    opt_a = torch.optim.Adam([a.scale for a in acts], lr=cfg.lr_a_scale) if acts else None
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=max(cfg.iters, 1)) if opt_a else None
    for a in acts:
        a.drop_prob = cfg.drop_prob
    beta = BetaSchedule(cfg.iters, cfg.warmup, *cfg.beta)
    gen = torch.Generator(device=q_in.device).manual_seed(seed)
    running = torch.zeros((), device=q_in.device)
    if progress is not None:
        progress(stage, 0, cfg.iters, {})
    try:
        for t in range(cfg.iters):
            idx = torch.randint(0, n, (bs,), generator=gen, device=q_in.device)
            x = q_in[idx]
            if cfg.drop_prob > 0:
                keep = torch.rand(x.shape, generator=gen, device=x.device) < cfg.drop_prob
                x = torch.where(keep, x, fp_in[idx])
            rec = reconstruction_loss(unit(x), fp_out[idx])
            loss = rec
            if cfg.round_weight > 0 and beta.regularizer_on(t):
                b = beta(t)
                loss = loss + cfg.round_weight * sum(w.regularizer(b) for w in rounding)
            opt_w.zero_grad(set_to_none=True)
            if opt_a:
                opt_a.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            if opt_a:
                opt_a.step()
                sched_a.step()
            running += rec.detach()
            if (t + 1) % LOG_EVERY == 0 or t + 1 == cfg.iters:
                _report(stage, t + 1, cfg.iters, running / ((t % LOG_EVERY) + 1), loss.detach(), progress)
                running.zero_()
    finally:
        for a in acts:
            a.drop_prob = 0.0
        for p in trainable:
            p.requires_grad_(False)
        for w in rounding:
            w.mode = "hard"


def _report(stage: str, step: int, total: int, rec: Tensor, loss: Tensor, progress: Progress | None) -> None:
    rec_v, loss_v = float(rec), float(loss)
    if not math.isfinite(loss_v):
        raise NumericalError(
            f"{stage}, iteration {step}: the loss is {loss_v}; the calibration images or learning rates "
            "produce non-finite values (check the images for NaN, or lower --lr values)"
        )
    log.debug("%s %d/%d rec %.4g loss %.4g", stage, step, total, rec_v, loss_v)
    if progress is not None:
        progress(stage, step, total, {"rec_loss": rec_v, "loss": loss_v})
