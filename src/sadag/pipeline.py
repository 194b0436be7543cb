"""The whole job as resumable stages: FP eval, calibration data, quantize + reconstruct, eval, export.

The CLI and the Python API both call :func:`run` (and :func:`generate_set` for `sadag generate`).
Every stage checkpoints its finished work atomically in ``RUN_DIR/state`` so that an interrupted run
continues where it stopped and reaches the same result. Generation methods are looked up in
:mod:`sadag.generation.context`; this module names none of them.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import distributed
from .config import (
    RunConfig,
    apply_preset,
    bits_label,
    check_calibration_minibatch,
    check_device,
    check_generation,
    check_input_paths,
    check_unused_settings,
    dump_yaml,
    method_options,
    result_settings,
    to_dict,
)
from .data import ImageFolderDataset, make_loader
from .data.calib import calibration_set
from .distributed import SINGLE, Ranks
from .errors import ConfigError, DataError, SadagError
from .evaluation import evaluate
from .generation import GenerationContext, get_method, images_digest, near_duplicates, save_synthetic_set
from .generation.builtin import GENIE_SET_DIGEST
from .generation.common import check_model_dtype
from .generation.duplicates import NEAR_COPY_COSINE
from .generation.lowpass import apply_lowpass
from .models import DataSpec, load_model
from .progress import Progress
from .quantization.prepare import freeze_, quantize
from .quantization.units import check_unit_names
from .reconstruction.reconstruct import check_minibatch_split, check_tf32, reconstruct_
from .rundir import RunDir, RunDirError, environment, module_digest, pin_input

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    name = check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of those")
    return device


class _Stages:
    """Times stages and forwards progress to the metrics log and the user's callback (rank 0 only)."""

    def __init__(self, rundir: RunDir, progress: Progress | None, ranks: Ranks = SINGLE) -> None:
        self.rundir, self.ranks = rundir, ranks
        self.user_progress = progress if ranks.is_main else None
        self.seconds: dict[str, float] = rundir.load_state("seconds.pt") or {}

    @contextmanager
    def stage(self, name: str, *, redone_whole: bool = False):  # noqa: ANN201
        """Time a stage; a checkpointed stage adds what a resume spends to what was spent before, a stage that
        a resume does again from the start (``redone_whole``) counts its last run only."""
        start = time.perf_counter()
        distributed.enter_stage(name, self.ranks)
        try:
            yield
        finally:
            before = 0.0 if redone_whole else self.seconds.get(name, 0.0)
            self.seconds[name] = round(before + time.perf_counter() - start, 2)
            self.rundir.save_state("seconds.pt", dict(self.seconds))
        distributed.leave_stage()  # not on an exception: the error message names the stage that failed

    def progress(self, stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.rundir.log_metrics({"stage": stage, "step": step, "total": total, **metrics})
        if self.user_progress is not None:
            self.user_progress(stage, step, total, metrics)


def _evaluate(model: nn.Module, dataset: ImageFolderDataset, cfg: RunConfig, device: torch.device,
              stages: _Stages, stage: str) -> dict[str, float]:
    if stages.ranks.enabled:  # each rank a contiguous slice; evaluate all-reduces the counts
        part = stages.ranks.slice(len(dataset))
        dataset = torch.utils.data.Subset(dataset, range(part.start, part.stop))
    loader = make_loader(dataset, cfg.eval_batch_size)
    return evaluate(model, loader, device, progress=stages.progress, stage=stage, total=len(loader),
                    ranks=stages.ranks)


def calibrate(model: nn.Module, spec: DataSpec, images: Tensor, cfg: RunConfig, rundir: RunDir | None,
              iters: int | None = None, state_name: str = "calib.pt", progress: Progress | None = None, *,
              ranks: Ranks = SINGLE) -> nn.Module:
    """quantize + reconstruct_, checkpointing after every unit when a run directory is given (data-parallel
    over ``ranks``: every rank holds all images and takes its slice of each minibatch). ``cfg`` is resolved
    here (preset, bits) as by every entry point."""
    cfg = apply_preset(cfg)
    example = torch.zeros(2, 3, spec.input_size, spec.input_size, device=images.device)
    qmodel = quantize(model, cfg.quant, example)
    calib_cfg = cfg.calib if iters is None else replace(cfg.calib, iters=iters)
    start = 0
    saved = rundir.load_state(state_name) if rundir else None
    if saved is not None:
        start = _load_checkpoint(qmodel, saved, rundir.state_path(state_name))
    # every rank has read the checkpoint before rank 0 may write the next one, and all start at the same unit
    start = distributed.agree(start, f"calibration checkpoints ({state_name}: next unit)", ranks, images.device)

    def checkpoint(k: int) -> None:
        if rundir is not None:
            rundir.save_state(state_name, {"next_unit": k + 1, "state_dict": dict(qmodel.state_dict())})

    label = "calibrate" if iters is None else "warm-up calibrate"
    reconstruct_(qmodel, images, calib_cfg, cfg.seed, start_unit=start, on_unit=checkpoint, progress=progress,
                 label=label, ranks=ranks)
    return freeze_(qmodel)


def _load_checkpoint(qmodel: nn.Module, saved: Any, path: Path) -> int:
    """The next unit to calibrate, from a calibration checkpoint loaded into ``qmodel``; one of another layout
    (made by another sadag version or for another model) is a run that cannot be continued, not a traceback."""
    try:
        qmodel.load_state_dict(saved["state_dict"])
        return int(saved["next_unit"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"the checkpoint {path} does not fit this run's quantized model ({reason[:200]}): it was "
                          "made by another sadag version or for another model; start over with --force (or delete "
                          "it and rerun with --resume to redo the calibration)") from exc


def _context(model: nn.Module, spec: DataSpec, cfg: RunConfig, rundir: RunDir | None, stages: _Stages | None,
             progress: Progress | None) -> GenerationContext:
    ranks = stages.ranks if stages is not None else SINGLE
    ctx = GenerationContext(model, spec, cfg, options=method_options(cfg), progress=progress, store=rundir,
                            ranks=ranks)
    ctx.calibrate = lambda images, iters, name: calibrate(model, spec, images, cfg, rundir, iters, name, progress,
                                                          ranks=ranks)
    if stages is not None:
        ctx.stage = stages.stage
    if rundir is not None and rundir.writable:
        ctx.publish = lambda name, qmodel: _export(qmodel, rundir.path(f"{name}.safetensors"), cfg, spec, cfg.method)
    return ctx


def _synthesize(model: nn.Module, spec: DataSpec, cfg: RunConfig, rundir: RunDir | None, stages: _Stages | None,
                progress: Progress | None) -> tuple[Tensor, dict[str, Any]]:
    """(images on the model's device, the method's artifacts) from the registered method ``cfg.method``."""
    ctx = _context(model, spec, cfg, rundir, stages, progress)
    images = get_method(cfg.method).generate(ctx)
    if cfg.gen.lowpass > 0:  # SynQ: a low-pass filter on the finished synthetic set
        images = apply_lowpass(images, spec, cfg.gen.lowpass)
    _check_finite(images, f"images of method {cfg.method}")
    return images.to(ctx.device), ctx.artifacts


def synthesize(model: nn.Module, spec: DataSpec, cfg: RunConfig, progress: Progress | None = None) -> Tensor:
    """Calibration images of a zero-shot method, (N, 3, S, S) on the model's device (no run directory)."""
    cfg = apply_preset(cfg)
    check_unused_settings(cfg, "generate")  # images only: nothing calibrated or evaluated
    return _synthesize(model, spec, cfg, None, None, progress)[0]


def _prepare(cfg: RunConfig, resume: bool, force: bool, calibrates: bool,
             command: Literal["run", "generate"] = "run") -> tuple[RunConfig, nn.Module, DataSpec, torch.device,
                                                                   RunDir, Ranks]:
    """Resolve and check the config, join torchrun's process group if launched by it, load the model, then
    (nothing written before) open the run directory: rank 0 writes it, the other ranks read it."""
    cfg = apply_preset(cfg)
    check_unused_settings(cfg, command)
    check_generation(cfg)
    if calibrates:
        check_calibration_minibatch(cfg)
    check_input_paths(cfg)
    if not cfg.out:
        raise ConfigError("a run needs an output directory (--out RUN_DIR)")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ranks, rank_device = distributed.init(check_device(cfg.device))
    if calibrates:  # before any image is generated
        check_minibatch_split(cfg.calib.batch_size, ranks)
    device = rank_device or resolve_device(cfg.device)
    check_tf32(cfg.calib, device)
    with distributed.local_main_first(ranks):  # one download per machine into its weights cache
        model, spec = load_model(cfg.model, weights=cfg.weights, trust_checkpoint=cfg.trust_checkpoint,
                                 device=device)
    check_model_dtype(model)  # every image sadag makes or loads is float32: other floats fail deep in the run
    check_generation(cfg, spec.input_size)  # what needs the model's input size
    digest = _agree_on_weights(model, cfg, ranks, device)
    if calibrates:  # the names; whether the forward calls them is found when the model is quantized
        check_unit_names(model, cfg.quant.units)
    rundir = _open_rundir(cfg, resume, force, ranks, device)
    try:  # the fingerprint names the model and its weights file; a resume must also find the same weights in it
        weights = f" with weights {cfg.weights}" if cfg.weights else ""
        pin_input(rundir, "model", digest, f"the model {cfg.model!r}{weights}")
        if rundir.writable:
            _record_environment(rundir, device, cfg.seed, ranks.world_size)
    except BaseException:
        rundir.close()
        raise
    return cfg, model.to(device).eval(), spec, device, rundir, ranks


def _agree_on_weights(model: nn.Module, cfg: RunConfig, ranks: Ranks, device: torch.device) -> str:
    """The digest of the model's state, the same on every rank: a stale weights file on one machine, or a
    factory that builds its model differently in each process, would give each rank another model."""
    weights = f" from {cfg.weights}" if cfg.weights else ""
    fix = ("every rank must load the same model: give every machine the same weights file (--weights), and a "
           "module:factory model must build the same weights in every process (load them, or seed its init)")
    return distributed.agree(module_digest(model), f"weights of the model {cfg.model!r}{weights} (digest of "
                             "their values)", ranks, device, fix=fix)


def _record_environment(rundir: RunDir, device: torch.device, seed: int, world_size: int) -> None:
    """environment.json: this session's versions, device and threads at the top, and under `sessions` every
    session's, the first included (a resume on another machine or thread count rounds floats differently)."""
    now = {**environment(device), "seed": seed, "world_size": world_size}
    try:
        old = json.loads(rundir.path("environment.json").read_text())
    except (OSError, ValueError):  # a new run, or a file that is not JSON: nothing to keep
        old = None
    sessions = [] if not isinstance(old, dict) else old.get("sessions") or [old]  # a run made before `sessions`
    rundir.write_json("environment.json", {**now, "sessions": [*sessions, now]})


def _open_rundir(cfg: RunConfig, resume: bool, force: bool, ranks: Ranks, device: torch.device) -> RunDir:
    rundir = _open_rundir_of_rank(cfg, resume, force, ranks, device)
    try:  # a folder of the same name on each machine would give each rank other checkpoints
        distributed.agree(rundir.identity(), f"run directories {cfg.out} (digest of their marker)", ranks, device)
    except BaseException:
        rundir.close()
        raise
    return rundir


def _open_rundir_of_rank(cfg: RunConfig, resume: bool, force: bool, ranks: Ranks, device: torch.device) -> RunDir:
    if not ranks.is_main:
        if not distributed.main_succeeded(False, ranks, device):
            raise SadagError(f"rank 0 could not open the run directory {cfg.out} (its message says why)")
        return RunDir(cfg.out, result_settings(cfg, device.type), read_only=True)
    try:
        rundir = RunDir(cfg.out, result_settings(cfg, device.type), resume=resume, force=force)
        try:
            rundir.path("config.yaml").write_text(dump_yaml(to_dict(cfg)))
        except BaseException:
            rundir.close()
            raise
    except BaseException:
        distributed.main_succeeded(False, ranks, device)
        raise
    distributed.main_succeeded(True, ranks, device)
    return rundir


def _calibration_images(model: nn.Module, spec: DataSpec, cfg: RunConfig, rundir: RunDir, stages: _Stages,
                        device: torch.device) -> tuple[Tensor, str, dict[str, str]]:
    """Images, the method that made them and the digest of the saved Genie set they started from, if any:
    --calib-data (a saved set or a real folder), or a fresh synthesis."""
    if cfg.calib_data:
        with stages.stage("load_calib"):
            num = cfg.num_calib if cfg.num_calib is not None or not _is_folder(cfg.calib_data) else cfg.gen.num_images
            images, meta = calibration_set(cfg.calib_data, spec, num, cfg.seed)
        return images.to(device), str(meta.get("method", "saved")), {}
    images, artifacts = _synthesize(model, spec, cfg, rundir, stages, stages.progress)
    if rundir.writable:
        save_synthetic_set(rundir.path("synthetic"), images.cpu(), spec, _set_meta(cfg), artifacts)
    source = {GENIE_SET_DIGEST: artifacts[GENIE_SET_DIGEST]} if GENIE_SET_DIGEST in artifacts else {}
    return images, cfg.method, source


def _is_folder(path: str) -> bool:
    from .generation.io import saved_set_file

    return saved_set_file(path) is None


def _set_meta(cfg: RunConfig) -> dict[str, Any]:
    return {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "preset": cfg.preset,
            "bits": bits_label(cfg.quant), "gen": to_dict(cfg.gen)}


def run(cfg: RunConfig, *, resume: bool = False, force: bool = False, progress: Progress | None = None,
        export: bool = True) -> dict[str, Any]:
    """Calibrate a quantized model for ``cfg`` and return (and write) its report."""
    cfg, model, spec, device, rundir, ranks = _prepare(cfg, resume, force, calibrates=True)
    with rundir:
        return _run(cfg, model, spec, device, _Stages(rundir, progress, ranks), export)


def _run(cfg: RunConfig, model: nn.Module, spec: DataSpec, device: torch.device, stages: _Stages,
         export: bool) -> dict[str, Any]:
    rundir = stages.rundir
    report: dict[str, Any] = {"model": cfg.model, "method": cfg.method, "w_bits": cfg.quant.w_bits,
                              "a_bits": cfg.quant.a_bits, "seed": cfg.seed, "preset": cfg.preset}
    eval_set = None
    if cfg.eval_data:  # the FP result is checkpointed: the quantized model must meet the same images
        eval_set = ImageFolderDataset(cfg.eval_data, spec, class_index=cfg.class_index, limit=cfg.eval_limit)
        pin_input(rundir, "eval_data", eval_set.digest(), f"eval_data (--eval-data) {cfg.eval_data}")
        fp = rundir.load_state("fp_eval.pt")
        if fp is None:
            with stages.stage("fp_eval"):
                fp = _evaluate(model, eval_set, cfg, device, stages, "evaluate FP")
            rundir.save_state("fp_eval.pt", fp)
        report.update(fp_top1=fp["top1"], fp_top5=fp["top5"], eval_images=fp["num_images"],
                      fp_nonfinite_images=fp.get("nonfinite_images"))  # None: a run made before it was counted
    images, method, source = _calibration_images(model, spec, cfg, rundir, stages, device)
    _check_finite(images, "calibration images")
    # the digests say by content which images a run calibrated on (and started from): paired runs can be checked
    digest = images_digest(images)
    if cfg.calib_data:  # read again on resume, after some units may be calibrated on it
        pin_input(rundir, "calib_data", digest, f"calib_data (--calib-data) {cfg.calib_data}")
    report.update(method=method, num_calib=int(images.shape[0]), calib_digest=digest, **source,
                  calib_near_duplicates=_count_near_duplicates(images, "calibration images"))
    with stages.stage("calibrate"):
        qmodel = calibrate(model, spec, images, cfg, rundir, progress=stages.progress, ranks=stages.ranks)
    report["fp_layers"] = list(qmodel.sadag_plan.fp_layers)  # the bits do not apply to them
    if eval_set is not None:
        with stages.stage("quant_eval", redone_whole=True):
            q = _evaluate(qmodel, eval_set, cfg, device, stages, "evaluate quantized")
        report.update(quant_top1=q["top1"], quant_top5=q["top5"], quant_nonfinite_images=q["nonfinite_images"])
    if export and rundir.writable:
        with stages.stage("export", redone_whole=True):
            _export(qmodel, rundir.path("quantized.safetensors"), cfg, spec, method)
    report["seconds"] = dict(stages.seconds)
    report["device"] = str(device)
    if stages.ranks.enabled:
        report["world_size"] = stages.ranks.world_size
    if rundir.writable:
        rundir.write_json("report.json", report)
        from .reporting import write_run_report

        write_run_report(rundir, report, images.cpu(), spec)
    return report


def _export(qmodel: nn.Module, path: Path, cfg: RunConfig, spec: DataSpec, method: str) -> None:
    """``method``: that of the images calibrated on (report.json's), not cfg.method, which --calib-data overrides."""
    from .export import save_quantized

    save_quantized(qmodel, path, model_name=cfg.model, spec=spec, quant_config=cfg.quant,
                   extra={"method": method, "seed": cfg.seed})


def generate_set(cfg: RunConfig, *, resume: bool = False, force: bool = False,
                 progress: Progress | None = None) -> Path:
    """`sadag generate`: synthesize calibration images once, to reuse at several bit widths (and, for a Genie
    set, as the start of SADAG: ``gen.genie_set``)."""
    if cfg.method == "real":
        raise ConfigError("generate makes synthetic images: choose a generation method, not real")
    warmup = cfg.method == "sadag" and not cfg.gen.warmup_model  # SADAG's stage B calibrates
    cfg, model, spec, _device, rundir, ranks = _prepare(cfg, resume, force, calibrates=warmup, command="generate")
    with rundir:
        stages = _Stages(rundir, progress, ranks)
        images, artifacts = _synthesize(model, spec, cfg, rundir, stages, stages.progress)
        meta = {**_set_meta(cfg), "seconds": stages.seconds, "near_duplicates": _count_near_duplicates(images, "set")}
        if rundir.writable:
            save_synthetic_set(rundir.root, images.cpu(), spec, meta, artifacts)
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
