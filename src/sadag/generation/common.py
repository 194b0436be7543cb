"""Helpers shared by the generators: seeding, freezing, a device-side plateau scheduler, progress."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelError, NumericalError
from ..modes import eval_mode
from ..progress import LOG_EVERY, Progress, host_floats, widest_float

# The first stages' tags, kept so that their seeds (and results) never change; any other stage name gets a
# tag from a hash of the name, above 2**32 so that it never meets these.
_STAGE_TAGS = {"genie-z": 1, "genie-g": 2, "swing": 3, "zeroq": 4, "sadag": 5}


def stage_tag(stage: str) -> int:
    if stage in _STAGE_TAGS:
        return _STAGE_TAGS[stage]
    return (1 << 32) + int.from_bytes(hashlib.sha256(stage.encode()).digest()[:4], "big")


def batch_seed(seed: int, batch: int, stage: str) -> int:
    """A 63-bit seed that depends only on (run seed, batch index, stage): batches are independent."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(batch), stage_tag(stage)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def cpu_generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def check_model_dtype(model: nn.Module) -> None:
    """The generators, latents, ZeroQ's pixels and every saved or real image are made in torch's default dtype
    (float32): a model whose floating parameters are in another (float64, bfloat16) passes the checks and then
    fails deep inside its first convolution, so it is refused here, naming the fix."""
    want = torch.get_default_dtype()
    other = [(n, p.dtype) for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != want]
    if other:
        name, dtype = other[0]
        more = f" and {len(other) - 1} more" if len(other) > 1 else ""
        fix = "model.float()" if want == torch.float32 else f"model.to({want})"
        raise ModelError(f"{type(model).__name__} has parameters in {dtype} ({name}{more}): sadag generates and "
                         f"calibrates in {want} (torch's default dtype), so the model must be in it too: convert it "
                         f"with {fix} (a module:factory model: return {fix})")


def probe_forward(model: nn.Module, input_size: int) -> None:
    """One no-grad, eval-mode forward pass of one zero image of ``input_size`` pixels in the model's dtype and on
    its device: what the forward calls, seen by the caller's hooks (the caller's train/eval flags are restored)."""
    param = next(model.parameters(), None)
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    with torch.no_grad(), eval_mode(model):
        model(torch.zeros(1, 3, input_size, input_size, **kw))


@contextlib.contextmanager
def frozen_eval(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad=False for the duration; the caller's flags (each submodule's mode too) are
    restored after."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        with eval_mode(*modules):
            for m in modules:
                m.requires_grad_(False)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def lr_dtype(device: torch.device) -> torch.dtype:
    # On CPU Adam reads the lr as a Python scalar: float64 matches torch's float scheduler bit for bit.
    # On accelerators Adam's capturable path divides float32 state by it: keep the usual float32.
    return torch.float64 if device.type == "cpu" else torch.float32


def tensor_lr_adam(params: list[Tensor], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam whose lr is a device tensor, so a scheduler can change it without a host sync.

    On CUDA-like devices `capturable=True` keeps the whole update on the device; on CPU the
    tensor lr is read as a CPU scalar, which costs no device sync.
    """
    lr_t = torch.tensor(lr, dtype=lr_dtype(device), device=device)
    capturable = device.type in ("cuda", "xpu", "hpu")
    return torch.optim.Adam(params, lr=lr_t, capturable=capturable, foreach=False if not capturable else None)


class DevicePlateau:
    """ReduceLROnPlateau(mode="min", threshold_mode="rel", cooldown=0) kept on the device.

    Same rule as torch's: the best loss improves when loss < best * (1 - threshold); after more than
    `patience` non-improving steps, lr <- max(lr * factor, min_lr) (skipped if the change is <= eps)
    and the counter resets. `lr` is the optimizer's tensor lr, updated in place.
    """

    def __init__(self, lr: Tensor, *, factor: float = 0.1, patience: int = 10, min_lr: float = 0.0,
                 threshold: float = 1e-4, eps: float = 1e-8) -> None:
        self.lr = lr
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.threshold, self.eps = threshold, eps
        self.best = torch.full((), math.inf, dtype=widest_float(lr.device), device=lr.device)
        self.bad = torch.zeros((), dtype=torch.int64, device=lr.device)

    def step(self, loss: Tensor) -> None:
        loss = loss.detach().to(self.best.dtype)
        better = loss < self.best * (1.0 - self.threshold)
        self.best = torch.where(better, loss, self.best)
        bad = torch.where(better, torch.zeros_like(self.bad), self.bad + 1)
        reduce = bad > self.patience
        new_lr = torch.clamp(self.lr * self.factor, min=self.min_lr)  # stays in the lr's dtype
        apply = reduce & (self.lr - new_lr > self.eps)
        with torch.no_grad():
            self.lr.copy_(torch.where(apply, new_lr, self.lr))
        self.bad = torch.where(reduce, torch.zeros_like(bad), bad)


def plateau_adam(params: list[Tensor], lr: float, device: torch.device, *, patience: int,
                 min_lr: float) -> tuple[torch.optim.Adam, DevicePlateau]:
    """tensor_lr_adam with a DevicePlateau on its lr (the latents' and ZeroQ's pixels' schedule)."""
    opt = tensor_lr_adam(params, lr, device)
    return opt, DevicePlateau(opt.param_groups[0]["lr"], patience=patience, min_lr=min_lr)


class CheckpointClock:
    """When a stage saves its mid-batch state: at iterations that are multiples of ``every``, and with ``seconds``
    > 0 no sooner than ``seconds`` after the last save nor than 20 times that save's own duration, so that saving
    (a generator with its Adam state: 1.2 GB per batch at 224 x 224) costs under 5% of the stage. A host clock:
    no device sync."""

    def __init__(self, every: int = 1, seconds: float = 0.0) -> None:
        self.every, self.seconds = max(1, every), seconds
        self.next = time.monotonic() + seconds

    def due(self, done: int, iters: int) -> bool:
        return done % self.every == 0 and done < iters and time.monotonic() >= self.next

    def save(self, write: Callable[[int], None], done: int) -> None:
        """write(done): build and save the state after ``done`` iterations, timed."""
        start = time.monotonic()
        write(done)
        now = time.monotonic()
        self.next = now + max(self.seconds, 20 * (now - start)) if self.seconds > 0 else now


def _cpu_copy(tree):  # noqa: ANN001, ANN202
    if isinstance(tree, Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cpu_copy(v) for v in tree)
    return tree


def latent_state(gen: nn.Module, z: Tensor, opt_z: torch.optim.Optimizer, opt_g: torch.optim.Optimizer,
                 plateau: DevicePlateau) -> dict:
    """A generator's and its latents' optimization state, as CPU tensors and plain values (a checkpoint)."""
    return _cpu_copy({"generator": gen.state_dict(), "z": z, "opt_z": opt_z.state_dict(),
                      "opt_g": opt_g.state_dict(), "plateau": {"best": plateau.best, "bad": plateau.bad,
                                                               "lr": plateau.lr}})


def load_latent_state(s: dict, gen: nn.Module, z: Tensor, opt_z: torch.optim.Optimizer,
                      opt_g: torch.optim.Optimizer, plateau: DevicePlateau) -> None:
    """Restore :func:`latent_state` in place; the plateau's lr stays the tensor the latents' optimizer reads."""
    gen.load_state_dict(s["generator"])
    with torch.no_grad():
        z.copy_(s["z"])
    lr = opt_z.param_groups[0]["lr"]
    opt_z.load_state_dict(s["opt_z"])
    opt_z.param_groups[0]["lr"] = lr
    opt_g.load_state_dict(s["opt_g"])
    with torch.no_grad():
        lr.copy_(s["plateau"]["lr"])
    plateau.best = s["plateau"]["best"].to(plateau.best.device)
    plateau.bad = s["plateau"]["bad"].to(plateau.bad.device)


class StageMonitor:
    """Accumulates a non-finite flag on the device; syncs only at log intervals and batch ends."""

    def __init__(self, stage: str, total: int, progress: Progress | None, log: logging.Logger,
                 hint: str, log_every: int = LOG_EVERY) -> None:
        self.stage, self.total, self.progress, self.log = stage, total, progress, log
        self.hint, self.log_every = hint, max(1, log_every)
        self.bad: Tensor | None = None

    def observe(self, loss: Tensor) -> None:
        flag = ~torch.isfinite(loss.detach())
        self.bad = flag if self.bad is None else self.bad | flag

    def due(self, it: int, iters: int) -> bool:
        # the first iteration too: a short refinement's metrics.jsonl then holds its starting losses
        return it == 0 or (it + 1) % self.log_every == 0 or it + 1 == iters

    def report(self, batch: int, it: int, step: int, metrics: dict[str, Tensor | float]) -> None:
        """Check for NaN/inf and emit progress; the only place the loop touches host values."""
        out = host_floats(metrics)
        self.check(batch, it, out.get("loss", 0.0))
        out["batch"] = float(batch)
        out["iteration"] = float(it + 1)  # the batch's own (step counts all batches of a pass: the curves' x is this)
        self.log.debug("%s batch %d iteration %d: %s", self.stage, batch, it + 1,
                       ", ".join(f"{k}={v:.4g}" for k, v in out.items()))
        if self.progress is not None:
            self.progress(self.stage, step, self.total, out)

    def report_group(self, indices: Sequence[int], it: int, iters: int,
                     metrics: Sequence[dict[str, Tensor | float]]) -> None:
        """report() for each batch of a group optimized in one pass, metrics[k] being the k-th batch's.

        The steps count every iteration of every batch (the batches before the group's first whole, the group's
        G batches it + 1 times each), one apart in batch order: the progress bar moves forward only and reads the share
        of the stage that is done (a batch's own b * iters + it + 1 would jump back at each batch of a group);
        with one batch per group they are the batch's own steps.
        """
        start = indices[0] * iters + it * len(indices)
        for k, (b, values) in enumerate(zip(indices, metrics, strict=True)):
            self.report(b, it, start + k + 1, values)

    def check(self, batch: int, it: int, value: float = math.nan) -> None:
        if self.bad is not None and bool(self.bad):
            what = f"loss is {value}" if not math.isfinite(value) else "loss was nan/inf"
            raise NumericalError(
                f"{self.stage} batch {batch} iteration {it + 1}: {what} (non-finite at or before this "
                f"iteration); {self.hint}"
            )
