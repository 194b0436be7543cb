"""Helpers shared by the benchmark scripts: shared-data paths, one run per row, tables and JSON."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import sadag
from sadag.config import METHOD_GEN_READS, apply_preset, result_settings
from sadag.pipeline import resolve_device
from sadag.progress import ProgressPrinter
from sadag.rundir import MARKER, RunDir

SHARED = Path(os.environ.get("SADAG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = {
    "resnet20_cifar10": SHARED / "weights/cifar10-resnet/resnet20-12fca82f.th",
    "resnet56_cifar10": SHARED / "weights/cifar10-resnet/resnet56-4bfd9763.th",
    "efficientnet_lite0": None,
}
EVAL = {
    "resnet20_cifar10": (SHARED / "data/cifar10-jpeg/test", None),
    "resnet56_cifar10": (SHARED / "data/cifar10-jpeg/test", None),
    "efficientnet_lite0": (SHARED / "data/imagenet-val500/val", SHARED / "data/imagenet-val500/wnids.txt"),
}
CIFAR_TRAIN = SHARED / "data/cifar10-jpeg/train-5k"
WORK = Path(__file__).parent / "out"  # sets and run directories (git-ignored), wherever the script is run from
RESULTS = Path(__file__).parent / "results"  # the JSON rows kept in git


def base_config(model: str, out: Path, **kwargs: Any) -> sadag.RunConfig:
    eval_data, class_index = EVAL[model]
    weights = WEIGHTS[model]
    return sadag.RunConfig(model=model, weights=str(weights) if weights else None, eval_data=str(eval_data),
                           class_index=str(class_index) if class_index else None, out=str(out), **kwargs)


def sections(budget: dict[str, dict[str, Any]], method: str | None = None) -> dict[str, Any]:
    """A budget table's {"calib": {...}, "gen": {...}} as explicit RunConfig sections (they win over the preset).
    With ``method``, only the gen settings that method reads: sadag refuses a setting its method would ignore,
    and one budget table serves every method."""
    kinds = {"quant": sadag.QuantConfig, "calib": sadag.CalibConfig, "gen": sadag.GenConfig}
    reads = METHOD_GEN_READS.get(method) if method else None
    return {name: kinds[name](**{k: v for k, v in values.items()
                                 if name != "gen" or reads is None or k in reads})
            for name, values in budget.items()}


def run_row(cfg: sadag.RunConfig) -> dict[str, Any]:
    """Run (or resume, or reuse a finished) configuration and return its report. A finished run is reused
    only when its recorded settings are this configuration's (RunDir refuses otherwise, naming them)."""
    report_file = Path(cfg.out) / "report.json"
    if report_file.exists():
        device_kind = resolve_device(cfg.device).type
        with RunDir(cfg.out, result_settings(apply_preset(cfg), device_kind), resume=True):
            return json.loads(report_file.read_text())
    start = time.perf_counter()
    report = sadag.run(cfg, resume=True, export=False, progress=log_progress())
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    return report


def calibration_of(directory: Path) -> dict[str, Any]:
    """The calibration a finished run used: its resolved config.yaml, and the engine from its marker, which holds
    what "auto" resolved to (a run made before the marker recorded that keeps the engine as typed)."""
    calib = yaml.safe_load((directory / "config.yaml").read_text())["calib"]
    marker = directory / MARKER
    resolved = json.loads(marker.read_text())["settings"] if marker.is_file() else {}
    # drop_draw: a run made before the setting existed drew uniform masks
    return {"calib_iters": calib["iters"], "calib_batch_size": calib.get("batch_size"),
            "drop_draw": calib.get("drop_draw", "uniform"),
            "engine": resolved.get("calib.engine", calib.get("engine"))}


def wide_split(iters: int, batch_size: int, ranks: int) -> tuple[int, int]:
    """(iterations, minibatch) of the wide data-parallel split: every rank a whole minibatch, 1/ranks of the
    iterations, so a unit sees the same images as ``iters`` steps of ``batch_size`` on one process (refused when
    ``ranks`` does not divide ``iters``: the split would see fewer images and not be the same budget)."""
    if iters % ranks:
        raise ValueError(f"the wide split of {iters} iterations over {ranks} ranks is not whole: give a multiple of "
                         f"{ranks} iterations, so that it sees the images of {iters} steps of {batch_size}")
    return iters // ranks, batch_size * ranks


def log_progress() -> ProgressPrinter:
    """Progress lines on stderr, at most one per stage every 30 s (benchmarks run in the background)."""
    return ProgressPrinter(min_interval=30.0)


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """`old` without the runs (named by the fields of `key`) that `new` has, then `new`."""
    fresh = {tuple(r.get(k) for k in key) for r in new}
    return [r for r in old if tuple(r.get(k) for k in key) not in fresh] + new


def write_results(name: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                  key: tuple[str, ...] | None = None) -> Path:
    """Write benchmarks/results/<name>.json. With `key` (the fields naming a run), the file's earlier rows are
    kept and a row of the same run is replaced, so that running one more seed or bit width keeps the others."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    if key is not None and path.is_file():
        rows = merge_rows(json.loads(path.read_text())["rows"], rows, key)
    path.write_text(json.dumps({"meta": {**meta, "machine": machine()}, "rows": rows}, indent=2) + "\n")
    return path
