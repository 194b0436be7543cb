"""reconstruct_(): calibrate a quantized model unit by unit (Genie-M / BRECQ / QDrop)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..config import CalibConfig, check_minibatch
from ..distributed import SINGLE, Ranks, all_reduce_gradients_, all_reduce_sum
from ..errors import ConfigError, NumericalError
from ..progress import LOG_EVERY, Progress, host_floats
from ..quantization.fold import bn_fused_into_convs
from ..quantization.modules import is_quant_layer
from ..quantization.prepare import float_copy, freeze_
from ..quantization.primitives import is_channels_last, keep_mask
from ..quantization.quantizers import ActQuantizer
from .cache import capture_unit_io, in_layout
from .losses import BetaSchedule, reconstruction_loss

log = logging.getLogger(__name__)


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
    ranks: Ranks = SINGLE,
) -> nn.Module:
    """Calibrate ``qmodel`` (from :func:`sadag.quantize`) in place on calibration images.

    Args:
        qmodel: the fake-quantized model; its FP twin (the reconstruction target) is derived from it.
        images: (N, 3, H, W) calibration images, normalised as the model expects, in the dtype and on the
            device of the model's parameters (checked first: ConfigError).
        cfg: iterations, minibatch size, learning rates, QDrop probability.
        seed: makes the minibatch sampling and QDrop masks reproducible, unit by unit.
        start_unit: skip units already calibrated (resume).
        on_unit: called with the unit index after each unit is done (checkpoint there).
        progress: called as progress(stage, step, total, metrics) every few hundred iterations.
        label: the stage name shown in progress and logs (e.g. "warm-up calibrate" for SADAG's stage B).
        ranks: torchrun's ranks: data-parallel, every rank holds all images and draws the same minibatches
            and masks, computes its slice and the gradients are all-reduced (the updates of one process).
    """
    cfg.validate()
    check_images(qmodel, images)
    check_minibatch(cfg.batch_size, images.shape[0])  # before any unit's work
    check_tf32(cfg, images.device)
    fp_model = float_copy(qmodel)
    units = qmodel.sadag_plan.units
    modules = dict(qmodel.named_modules())
    layout = unit_layout(cfg.resolved_engine(images.device.type), images.device)
    for k, unit in enumerate(units):
        if k < start_unit:
            continue
        torch.manual_seed(seed * 10_007 + k)
        fp_in, fp_out = capture_unit_io(fp_model, unit, images, cfg.batch_size, memory_format=layout)
        q_in, _ = capture_unit_io(qmodel, unit, images, cfg.batch_size, want_output=False, memory_format=layout)
        stage = f"{label} unit {k + 1}/{len(units)} ({unit})"
        calibrate_unit_(modules[unit], fp_in, q_in, fp_out, cfg, seed * 10_007 + k, stage, progress, ranks)
        if on_unit is not None:
            on_unit(k)
    return freeze_(qmodel)


def check_images(qmodel: nn.Module, images: Tensor) -> None:
    """Calibration images are a 4-d float batch of the model's dtype on its device: anything else fails deep in
    torch (or, uint8 pixels, calibrates on unnormalised values)."""
    param = next(qmodel.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (images.dtype, images.device)
    if images.dim() != 4:
        raise ConfigError(f"calibration images of shape {tuple(images.shape)}: give a 4-d batch (N, 3, H, W) "
                          "(a single image x as x.unsqueeze(0))")
    if not images.is_floating_point():
        raise ConfigError(f"calibration images of dtype {images.dtype}: give float images normalised as the model "
                          f"expects (e.g. pixels / 255, then the model's mean and std), as {dtype}")
    if images.dtype != dtype:
        raise ConfigError(f"calibration images of dtype {images.dtype} for a model in {dtype}: convert them with "
                          f"images.to({dtype})")
    if images.device != device:
        raise ConfigError(f"calibration images on {images.device} for a model on {device}: move them with "
                          f"images.to('{device}') (or the model to theirs)")


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


class MinibatchSampler:
    """Minibatch indices drawn in bulk on the device: permuted epochs (Genie's reconstruct.py:96, the
    last partial minibatch of an epoch dropped) or, with sampling="replacement", uniform draws."""

    def __init__(self, n: int, bs: int, sampling: str, gen: torch.Generator, device: torch.device) -> None:
        self.n, self.bs, self.sampling, self.gen, self.device = n, bs, sampling, gen, device
        self.chunk = max(1, n // bs) if sampling == "epochs" else 256
        self.rows: list[Tensor] = []

    def next(self) -> Tensor:
        if not self.rows:
            if self.sampling == "epochs":
                perm = torch.randperm(self.n, generator=self.gen, device=self.device)
                block = perm[: self.chunk * self.bs].view(self.chunk, self.bs)
            else:
                block = torch.randint(0, self.n, (self.chunk, self.bs), generator=self.gen, device=self.device)
            self.rows = list(block.unbind(0))[::-1]
        return self.rows.pop()


def _optimizers(rounding: list, acts: list[ActQuantizer], cfg: CalibConfig) -> tuple[list, list, list[Tensor]]:
    """Adam on V; Adam on the step sizes, cosine-annealed (weights too with cfg.anneal_w_scale, as Genie)."""
    w_scales = [w.scale for w in rounding] if cfg.lr_w_scale > 0 else []
    plain = [{"params": [w.alpha for w in rounding], "lr": cfg.lr_round}]
    annealed = [{"params": [a.scale for a in acts], "lr": cfg.lr_a_scale}] if acts else []
    if w_scales:
        (annealed if cfg.anneal_w_scale else plain).append({"params": w_scales, "lr": cfg.lr_w_scale})
    opts = [torch.optim.Adam(plain)]
    scheds = []
    if annealed:
        opts.append(torch.optim.Adam(annealed))
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opts[-1], T_max=max(cfg.iters, 1)))
    trainable = [p for opt in opts for g in opt.param_groups for p in g["params"]]
    return opts, scheds, trainable


def check_minibatch_split(batch_size: int, ranks: Ranks) -> None:
    """Every rank takes a slice of each minibatch: at least one image each."""
    if batch_size < ranks.world_size:
        raise ConfigError(f"a calibration minibatch of {batch_size} images cannot be split over {ranks.world_size} "
                          "ranks: raise calib.batch_size (--calib-batch-size) or start fewer processes")


def unit_layout(engine: str, device: torch.device) -> torch.memory_format:
    """The fused engine's activations on a CPU are channels_last: oneDNN's convolutions of few channels ran
    2-3x faster so (a 16-channel 32x32 one, forward and backward), and a fused BatchNorm leaves no op that
    is slow in that layout."""
    return torch.channels_last if engine == "fused" and device.type == "cpu" else torch.contiguous_format


@torch.no_grad()
def _layout_that_runs(unit: nn.Module, x: Tensor, layout: torch.memory_format, stage: str) -> torch.memory_format:
    """channels_last if the unit's forward runs on it, else the contiguous layout: a forward that flattens with
    ``x.view(x.size(0), -1)`` needs contiguous inputs. The trial forward draws no random numbers (no quantizer
    is initialised or dropping yet)."""
    if layout != torch.channels_last or x.dim() != 4:
        return layout
    try:
        unit(in_layout(x, layout))
    except RuntimeError as e:
        log.warning("%s: its forward fails on channels_last inputs (%s); calibrating it on contiguous inputs "
                    "(slower on a CPU)", stage, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return torch.contiguous_format
    return layout


def _loss_fn(unit: nn.Module, rounding: list, cfg: CalibConfig, engine: str, device: torch.device):  # noqa: ANN202
    def loss(x: Tensor, target: Tensor, beta: Tensor, reg_on: bool) -> tuple[Tensor, Tensor]:
        rec = reconstruction_loss(unit(x), target)
        if not reg_on:
            return rec, rec
        return rec, rec + cfg.round_weight * sum(w.regularizer(beta) for w in rounding)

    if engine != "compiled":
        return loss
    # CUDA: CUDA graphs replay the launch-bound step; CPU: inductor's kernels. The input mix and minibatches
    # come from the unit's generator as in eager; the quantizers' in-unit masks from the compiled graph's draws
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(loss, mode=mode, dynamic=False)


def calibrate_unit_(
    unit: nn.Module,
    fp_in: Tensor,
    q_in: Tensor,
    fp_out: Tensor,
    cfg: CalibConfig,
    seed: int,
    stage: str = "calibrate",
    progress: Progress | None = None,
    ranks: Ranks = SINGLE,
) -> None:
    """AdaRound + learned step sizes on one unit, with QDrop's input mixing and quantizer dropping.

    No host sync in the loop except at log points; with cfg.engine "compiled" the quantized forward,
    loss and their backward are compiled once per unit shape (seconds reported as "compile_s").
    """
    layers, acts = _unit_parts(unit)
    check_minibatch(cfg.batch_size, q_in.shape[0])
    bs = cfg.batch_size
    check_minibatch_split(bs, ranks)
    device = q_in.device
    engine = cfg.resolved_engine(device.type)
    layout = _layout_that_runs(unit, q_in[:bs], unit_layout(engine, device), stage)
    fp_in, q_in, fp_out = (in_layout(t, layout) for t in (fp_in, q_in, fp_out))  # no copy from reconstruct_
    _init_act_quantizers(unit, acts, q_in[:bs])
    for layer in layers:
        layer.weight_quantizer.start_adaround(layer.weight)
    # before any QDrop mask is drawn: the check forward of the fusion must not consume random numbers
    fused = bn_fused_into_convs(unit, q_in[:bs]) if engine == "fused" else contextlib.nullcontext()
    with fused:
        _calibrate(unit, layers, acts, (fp_in, q_in, fp_out), cfg, seed, engine, stage, progress, ranks)


def _calibrate(unit: nn.Module, layers: list[nn.Module], acts: list[ActQuantizer], data: tuple[Tensor, Tensor, Tensor],
               cfg: CalibConfig, seed: int, engine: str, stage: str, progress: Progress | None, ranks: Ranks) -> None:
    """The optimisers, the step and the QDrop state around _train; every quantizer left hard and frozen."""
    bs = cfg.batch_size
    rounding = [layer.weight_quantizer for layer in layers]
    opts, scheds, trainable = _optimizers(rounding, acts, cfg)
    # only what an optimiser updates gets gradients (a fixed weight step size, lr_w_scale 0, gets none)
    others = {p: p.requires_grad for p in unit.parameters()}
    for p in others:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    for a in acts:
        a.drop_prob, a.drop_draw = cfg.drop_prob, cfg.drop_draw
        a.rows = (ranks.slice(bs), bs) if ranks.enabled else None
    device = data[1].device
    gen = torch.Generator(device=device).manual_seed(seed)
    sampler = MinibatchSampler(data[1].shape[0], bs, cfg.sampling, gen, device)
    step = _loss_fn(unit, rounding, cfg, engine, device)
    if progress is not None:
        progress(stage, 0, cfg.iters, {})
    try:
        with _engine_context(engine, device), tf32_mode(cfg.tf32, device):
            _train(step, engine == "compiled", (opts, scheds, trainable), sampler, data, cfg, gen, stage, progress,
                   ranks)
    finally:
        for a in acts:
            a.drop_prob = 0.0
            a.rows = None
        for p, wanted in others.items():
            p.requires_grad_(wanted)
        for p in trainable:
            p.requires_grad_(False)
        for w in rounding:
            w.mode = "hard"


def check_tf32(cfg: CalibConfig, device: torch.device) -> None:
    """calib.tf32 is a CUDA setting: refused elsewhere rather than silently ignored."""
    if cfg.tf32 and device.type != "cuda":
        raise ConfigError(f"calib.tf32 (--tf32) selects TF32 on CUDA GPUs; this run is on {device.type}: drop it")


@contextlib.contextmanager
def tf32_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """TF32 convolutions and matmuls on or off on CUDA, torch's global settings restored on exit. Only the
    fp32_precision API: torch refuses to read the legacy allow_tf32 flags once a user has set the new one."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def _engine_context(engine: str, device: torch.device) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    if engine != "compiled":
        return stack
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # one graph per unit shape and regulariser phase: a 20-layer CIFAR network alone has 12, above dynamo's default 8
    stack.enter_context(dynamo_config.patch(recompile_limit=64))
    if device.type == "cpu":  # aten's generator for QDrop's in-unit masks (still not eager's order of draws)
        stack.enter_context(inductor_config.patch(fallback_random=True))
    return stack


def _train(step, compiled: bool, optim: tuple[list, list, list[Tensor]], sampler: MinibatchSampler,  # noqa: ANN001
           data: tuple[Tensor, Tensor, Tensor], cfg: CalibConfig, gen: torch.Generator, stage: str,
           progress: Progress | None, ranks: Ranks) -> None:
    """The unit's iterations. Data-parallel: the loss is a mean over the minibatch, so this rank's gradient
    weighted by its share of the minibatch, summed over the ranks, is the whole minibatch's; the rounding
    regulariser, added on every rank, is counted once in total (the shares sum to 1)."""
    fp_in, q_in, fp_out = data
    opts, scheds, trainable = optim
    part = ranks.slice(sampler.bs)
    weight = (part.stop - part.start) / sampler.bs
    beta = BetaSchedule(cfg.iters, cfg.warmup, *cfg.beta)
    device = q_in.device
    running = torch.zeros((), device=device)
    beta_t = torch.zeros((), device=device)  # a tensor: a compiled step is not recompiled as beta moves
    compile_s = 0.0
    for t in range(cfg.iters):
        idx = sampler.next()
        rows = idx[part]
        x = q_in[rows]
        if cfg.drop_prob > 0:  # drawn for the whole minibatch on every rank, so every rank draws the same
            keep = keep_mask((idx.shape[0], *x.shape[1:]), cfg.drop_prob, cfg.drop_draw, generator=gen,
                             device=device, channels_last=is_channels_last(x), dtype=x.dtype)[part]
            x = torch.lerp(fp_in[rows], x, keep)  # exact at 0 and 1, and 5x a bool where on a CPU
        reg_on = cfg.round_weight > 0 and beta.regularizer_on(t)
        beta_t.fill_(beta(t))
        first_call = compiled and (t == 0 or (reg_on and not beta.regularizer_on(t - 1)))  # (re)compiles
        start = time.perf_counter()
        rec, loss = step(x, fp_out[rows], beta_t, reg_on)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients_(trainable, weight, ranks)
        if first_call:
            compile_s += time.perf_counter() - start
        for opt in opts:
            opt.step()
        for sched in scheds:
            sched.step()
        running += rec.detach()
        if (t + 1) % LOG_EVERY == 0 or t + 1 == cfg.iters:
            extra = {"compile_s": compile_s} if compiled else {}
            mean_rec, loss_now, rec_now = running / ((t % LOG_EVERY) + 1), loss.detach(), rec.detach()
            if ranks.enabled:  # the whole minibatch's values: every rank's, weighted by its share
                mean_rec, loss_now, rec_now = all_reduce_sum(torch.stack([mean_rec, loss_now, rec_now]) * weight,
                                                             ranks).unbind()
            extra["round_loss"] = loss_now - rec_now  # the rounding regulariser's weighted term, this step
            _report(stage, t + 1, cfg.iters, mean_rec, loss_now, progress, extra)
            running.zero_()


def _report(stage: str, step: int, total: int, rec: Tensor, loss: Tensor, progress: Progress | None,
            extra: dict[str, float | Tensor]) -> None:
    values = host_floats({**extra, "rec_loss": rec, "loss": loss})
    rec_v, loss_v = values.pop("rec_loss"), values.pop("loss")
    if not math.isfinite(loss_v):
        raise NumericalError(
            f"{stage}, iteration {step}: the loss is {loss_v}; the calibration images or learning rates "
            "produce non-finite values (check the images for NaN, or lower --lr values)"
        )
    log.debug("%s %d/%d rec %.4g loss %.4g", stage, step, total, rec_v, loss_v)
    if progress is not None:
        progress(stage, step, total, {"rec_loss": rec_v, "loss": loss_v, **values})
