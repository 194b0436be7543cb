"""report.md, the calibration image grid and loss curves of a run directory."""

from __future__ import annotations

import json
import logging
from collections import defaultdict

from torch import Tensor

from .generation.io import image_grid
from .models import DataSpec
from .rundir import RunDir, atomic_write_text

log = logging.getLogger(__name__)


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "-" if value is None else str(value)


def report_markdown(report: dict) -> str:
    bits = f"W{report['w_bits']}A{report['a_bits'] or 'FP'}"
    lines = [
        f"# sadag run: {report['model']} {bits} ({report['method']})",
        "",
        "| model | method | bits | calib images | FP top-1 | FP top-5 | quant top-1 | quant top-5 | drop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp, q = report.get("fp_top1"), report.get("quant_top1")
    drop = fp - q if fp is not None and q is not None else None
    lines.append(
        f"| {report['model']} | {report['method']} | {bits} | {report['num_calib']} | {_fmt(fp)} | "
        f"{_fmt(report.get('fp_top5'))} | {_fmt(q)} | {_fmt(report.get('quant_top5'))} | {_fmt(drop)} |"
    )
    lines += ["", f"Seed {report['seed']}, preset `{report['preset']}`, device {report.get('device')}, "
              f"evaluated on {report.get('eval_images', '-')} images.", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.get("seconds", {}).items()]
    return "\n".join(lines) + "\n"


def write_run_report(rundir: RunDir, report: dict, images: Tensor, spec: DataSpec) -> None:
    atomic_write_text(rundir.path("report.md"), report_markdown(report))
    image_grid(images, spec).save(rundir.path("calibration_grid.png"))
    plot_loss_curves(rundir)


def plot_loss_curves(rundir: RunDir) -> None:
    """One PNG of every stage's logged loss against its step (needs matplotlib, the `plots` extra)."""
    if not rundir.metrics_file.exists():
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping loss curves (pip install 'sadag[plots]')")
        return
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in rundir.metrics_file.read_text().splitlines():
        rec = json.loads(line)
        value = rec.get("loss", rec.get("rec_loss"))
        if value is not None:
            curves[rec["stage"]].append((rec["step"], value))
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    for stage, points in curves.items():
        steps, values = zip(*sorted(points), strict=True)
        ax.plot(steps, values, label=stage, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    if len(curves) <= 16:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(rundir.path("loss_curves.png"), dpi=100)
    plt.close(fig)
