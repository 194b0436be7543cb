"""The whole job as resumable stages: FP eval, calibration data, quantize + reconstruct, eval, export.

The CLI and the Python API both call :func:`run` (and :func:`generate_set` for `sadag generate`).
Every stage checkpoints its finished work atomically in ``RUN_DIR/state`` so that an interrupted run
continues where it stopped and reaches the same result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .config import RunConfig, apply_preset, to_dict
from .data import ImageFolderDataset, load_calibration_data, make_loader
from .data.calib import saved_set_meta
from .errors import ConfigError, DataError, SadagError
from .evaluation import evaluate
from .generation import (
    GenieBatch,
    generate_genie,
    generate_noise,
    generate_zeroq,
    near_duplicates,
    refine_sadag,
    save_synthetic_set,
)
from .generation.duplicates import NEAR_COPY_COSINE
from .models import DataSpec, load_model
from .quantization.prepare import freeze_, quantize
from .reconstruction.reconstruct import reconstruct_
from .rundir import RunDir, environment

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int, dict[str, float]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


class _Stages:
    """Times stages and forwards progress to the metrics log and the user's callback."""

    def __init__(self, rundir: RunDir, progress: Progress | None, seconds: dict[str, float]):
        self.rundir, self.user_progress, self.seconds = rundir, progress, seconds

    @contextmanager
    def stage(self, name: str):  # noqa: ANN201
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)
            self.rundir.save_state("seconds.pt", dict(self.seconds))

    def progress(self, stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.rundir.log_metrics({"stage": stage, "step": step, "total": total, **metrics})
        if self.user_progress is not None:
            self.user_progress(stage, step, total, metrics)


def _eval_loader(cfg: RunConfig, spec: DataSpec):  # noqa: ANN202
    dataset = ImageFolderDataset(cfg.eval_data, spec, class_index=cfg.class_index, limit=cfg.eval_limit)
    return make_loader(dataset, cfg.eval_batch_size)


def _evaluate(model: nn.Module, cfg: RunConfig, spec: DataSpec, device: torch.device, stages: _Stages,
              stage: str) -> dict[str, float]:
    loader = _eval_loader(cfg, spec)
    return evaluate(model, loader, device, progress=stages.progress, stage=stage, total=len(loader))


def _example(spec: DataSpec, device: torch.device) -> Tensor:
    return torch.zeros(2, 3, spec.input_size, spec.input_size, device=device)


def calibrate(model: nn.Module, spec: DataSpec, images: Tensor, cfg: RunConfig, rundir: RunDir | None,
              iters: int | None = None, state_name: str = "calib.pt", progress: Progress | None = None) -> nn.Module:
    """quantize + reconstruct_, checkpointing after every unit when a run directory is given."""
    device = images.device
    qmodel = quantize(model, cfg.quant, _example(spec, device))
    calib_cfg = cfg.calib if iters is None else replace(cfg.calib, iters=iters)
    start = 0
    saved = rundir.load_state(state_name) if rundir else None
    if saved is not None:
        qmodel.load_state_dict(saved["state_dict"])
        start = saved["next_unit"]

    def checkpoint(k: int) -> None:
        if rundir is not None:
            rundir.save_state(state_name, {"next_unit": k + 1, "state_dict": qmodel.state_dict()})

    label = "calibrate" if iters is None else "warm-up calibrate"
    reconstruct_(qmodel, images, calib_cfg, cfg.seed, start_unit=start, on_unit=checkpoint, progress=progress,
                 label=label)
    return freeze_(qmodel)


def _finished(rundir: RunDir | None, prefix: str, count: int) -> dict[int, Any]:
    """The per-batch checkpoints ``state/{prefix}_{k}.pt`` already written, by batch index."""
    found = {k: rundir.load_state(f"{prefix}_{k}.pt") for k in range(count)} if rundir else {}
    return {k: v for k, v in found.items() if v is not None}


def _checkpointer(rundir: RunDir | None, prefix: str) -> Callable[[int, Any], None]:
    def save(k: int, obj: Any) -> None:
        if rundir is not None:
            rundir.save_state(f"{prefix}_{k}.pt", obj)

    return save


def _genie_batches(model: nn.Module, spec: DataSpec, cfg: RunConfig, rundir: RunDir | None,
                   progress: Progress | None) -> list[GenieBatch]:
    done = _finished(rundir, "genie_batch", _num_batches(cfg))
    save = _checkpointer(rundir, "genie_batch")
    return generate_genie(model, spec, cfg.gen, cfg.seed, done=done, on_batch=lambda b: save(b.index, b),
                          progress=progress)


def _num_batches(cfg: RunConfig) -> int:
    return -(-cfg.gen.num_images // cfg.gen.batch_size)


def synthesize(model: nn.Module, spec: DataSpec, cfg: RunConfig, rundir: RunDir | None = None,
               stages: _Stages | None = None, progress: Progress | None = None) -> Tensor:
    """Calibration images for a zero-shot method, (N, 3, S, S) on the model's device."""
    device = next(model.parameters()).device
    timed = stages.stage if stages else _no_stage
    if cfg.method == "noise":
        with timed("generate"):
            return generate_noise(spec, cfg.gen.num_images, cfg.seed).to(device)
    if cfg.method == "zeroq":
        with timed("generate"):
            return generate_zeroq(model, spec, cfg.gen, cfg.seed, progress=progress).to(device)
    with timed("generate"):
        batches = _genie_batches(model, spec, cfg, rundir, progress)
    warmup = torch.cat([b.images for b in batches]).to(device)
    if cfg.method == "genie":
        return warmup
    with timed("warmup_calibrate"):  # SADAG stage B
        q_warm = calibrate(model, spec, warmup, cfg, rundir, cfg.gen.warmup_calib_iters, "warmup_calib.pt", progress)
    with timed("refine"):  # SADAG stage C
        images = refine_sadag(model, q_warm, batches, spec, cfg.gen, cfg.seed,
                              done=_finished(rundir, "refined", len(batches)),
                              on_batch=_checkpointer(rundir, "refined"), progress=progress)
    return images.to(device)


@contextmanager
def _no_stage(_name: str):  # noqa: ANN202
    yield


def _prepare(cfg: RunConfig) -> tuple[RunConfig, nn.Module, DataSpec, torch.device]:
    cfg = apply_preset(cfg)
    device = resolve_device(cfg.device)
    model, spec = load_model(cfg.model, weights=cfg.weights)
    return cfg, model.to(device).eval(), spec, device


def _calibration_images(model: nn.Module, spec: DataSpec, cfg: RunConfig, rundir: RunDir, stages: _Stages,
                        device: torch.device) -> tuple[Tensor, str]:
    """Images and the method that made them: a saved set, a real folder, or a fresh synthesis."""
    meta = saved_set_meta(cfg.calib_data) if cfg.calib_data else None
    if meta is not None or cfg.method == "real":
        if not cfg.calib_data:
            raise ConfigError("--method real needs --calib-data DIR (a folder of real images)")
        with stages.stage("load_calib"):
            num = cfg.num_calib if cfg.num_calib is not None else (None if meta is not None else 1024)
            images = load_calibration_data(cfg.calib_data, spec, num, cfg.seed, cfg.class_index)
        return images.to(device), (meta or {}).get("method", "real")
    images = synthesize(model, spec, cfg, rundir, stages, stages.progress)
    save_synthetic_set(rundir.path("synthetic"), images.cpu(), spec, _set_meta(cfg))
    return images, cfg.method


def _set_meta(cfg: RunConfig) -> dict[str, Any]:
    return {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "preset": cfg.preset,
            "bits": cfg.bits, "gen": to_dict(cfg.gen)}


def _write_config(rundir: RunDir, cfg: RunConfig, device: torch.device) -> None:
    (rundir.path("config.yaml")).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    rundir.write_json("environment.json", {**environment(device), "seed": cfg.seed})


def run(cfg: RunConfig, *, resume: bool = False, force: bool = False, progress: Progress | None = None,
        export: bool = True) -> dict[str, Any]:
    """Calibrate a quantized model for ``cfg`` and return (and write) its report."""
    if not cfg.out:
        raise ConfigError("a run needs an output directory (--out RUN_DIR)")
    cfg, model, spec, device = _prepare(cfg)
    rundir = RunDir(cfg.out, resume=resume, force=force)
    _write_config(rundir, cfg, device)
    seconds = rundir.load_state("seconds.pt") or {}
    stages = _Stages(rundir, progress, seconds)
    report: dict[str, Any] = {"model": cfg.model, "method": cfg.method, "w_bits": cfg.quant.w_bits,
                              "a_bits": cfg.quant.a_bits, "seed": cfg.seed, "preset": cfg.preset}
    if cfg.eval_data:
        fp = rundir.load_state("fp_eval.pt")
        if fp is None:
            with stages.stage("fp_eval"):
                fp = _evaluate(model, cfg, spec, device, stages, "evaluate FP")
            rundir.save_state("fp_eval.pt", fp)
        report.update(fp_top1=fp["top1"], fp_top5=fp["top5"], eval_images=fp["num_images"])
    images, method = _calibration_images(model, spec, cfg, rundir, stages, device)
    _check_finite(images, "calibration images")
    report.update(method=method, num_calib=int(images.shape[0]),
                  calib_near_duplicates=_count_near_duplicates(images, "calibration images"))
    with stages.stage("calibrate"):
        qmodel = calibrate(model, spec, images, cfg, rundir, progress=stages.progress)
    if cfg.eval_data:
        with stages.stage("quant_eval"):
            q = _evaluate(qmodel, cfg, spec, device, stages, "evaluate quantized")
        report.update(quant_top1=q["top1"], quant_top5=q["top5"])
    if export:
        with stages.stage("export"):
            _export(qmodel, rundir, cfg, spec)
    report["seconds"] = dict(seconds)
    report["device"] = str(device)
    rundir.write_json("report.json", report)
    from .reporting import write_run_report

    write_run_report(rundir, report, images.cpu(), spec)
    return report


def _export(qmodel: nn.Module, rundir: RunDir, cfg: RunConfig, spec: DataSpec) -> None:
    from .export import save_quantized

    save_quantized(qmodel, rundir.path("quantized.safetensors"), model_name=cfg.model, spec=spec,
                   quant_config=cfg.quant, extra={"method": cfg.method, "seed": cfg.seed})


def generate_set(cfg: RunConfig, *, resume: bool = False, force: bool = False,
                 progress: Progress | None = None) -> Path:
    """`sadag generate`: synthesize calibration images once, to reuse at several bit widths."""
    if cfg.method == "real":
        raise ConfigError("generate makes synthetic images: choose --method sadag, genie, zeroq or noise")
    if not cfg.out:
        raise ConfigError("generate needs an output directory (--out DIR)")
    cfg, model, spec, device = _prepare(cfg)
    rundir = RunDir(cfg.out, resume=resume, force=force)
    _write_config(rundir, cfg, device)
    stages = _Stages(rundir, progress, rundir.load_state("seconds.pt") or {})
    images = synthesize(model, spec, cfg, rundir, stages, stages.progress)
    _check_finite(images, "generated images")
    save_synthetic_set(rundir.root, images.cpu(), spec, {**_set_meta(cfg), "seconds": stages.seconds,
                                                         "near_duplicates": _count_near_duplicates(images, "set")})
    return rundir.root


def _count_near_duplicates(images: Tensor, what: str) -> int:
    """near_duplicates(), with a warning when more than a tenth of the images have a near-copy."""
    count = near_duplicates(images)
    if count > 0.1 * images.shape[0]:
        log.warning("%d of the %d %s have a near-copy in the set (pixel cosine > %s): the generator collapsed "
                    "onto few images, so the set is less diverse than its size suggests; look at its grid.png. "
                    "With Genie-D this happens when latents shrink toward 0 (they all map to one image): --lr-z 0.01 "
                    "(gen.lr_z) avoided it on EfficientNet-Lite0", count, images.shape[0], what, NEAR_COPY_COSINE)
    return count


def _check_finite(images: Tensor, what: str) -> None:
    if not torch.isfinite(images).all():
        raise DataError(f"the {what} contain NaN or infinite values; regenerate them or check the data folder")


__all__ = ["run", "generate_set", "calibrate", "synthesize", "resolve_device", "SadagError"]
