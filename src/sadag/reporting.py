"""report.md, the calibration image grid and the loss curves of a run directory.

The curves are read back from ``metrics.jsonl`` as the pipeline writes it: one record per logged step,
``{"stage", "step", "total", <metric>: value, ...}``. Generation stages log a ``batch`` and their losses
(Genie-D and ZeroQ: ``loss``; SADAG: ``bn``, ``gm``, ``div``); calibration stages are named
``"<label> unit k/n (<module>)"`` and log ``rec_loss`` (mean since the last log) and ``loss`` (reconstruction
plus the weighted rounding regulariser; ``round_loss`` alone when the loop reports it). Stages that are
absent (a real-data run, a resumed run) are simply left out.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from .generation.io import image_grid
from .models import DataSpec
from .rundir import RunDir, atomic_write_text

log = logging.getLogger(__name__)

CURVES, GRID = "loss_curves.png", "calibration_grid.png"
_UNIT_STAGE = re.compile(r"^(?P<label>.+) unit (?P<k>\d+)/(?P<n>\d+) \((?P<unit>.+)\)$")


@dataclass(frozen=True)
class _Kind:
    """How one stage of metrics.jsonl is drawn and summarised."""

    title: str
    seconds_key: str  # the key of report["seconds"] that timed this stage
    metrics: tuple[tuple[str, str], ...]  # (metric key, panel label), one panel each
    per: str  # "batch" or "unit": what one line of a panel is


_GENERATION = {
    "genie-d": _Kind("Genie-D", "generate", (("loss", "BN-statistics loss"),), "batch"),
    "zeroq": _Kind("ZeroQ", "generate", (("loss", "BN-statistics loss"),), "batch"),
    "sadag refine": _Kind("SADAG refinement", "refine",
                          (("bn", "L_BN (BN statistics)"), ("gm", "L_GM (gradient matching)"),
                           ("div", "L_D (diversity)")), "batch"),
}
_CALIBRATION = {
    "warm-up calibrate": _Kind("Warm-up calibration (SADAG stage B)", "warmup_calibrate",
                               (("rec_loss", "reconstruction loss"), ("loss", "rec. + rounding loss")), "unit"),
    "calibrate": _Kind("Calibration", "calibrate",
                       (("rec_loss", "reconstruction loss"), ("loss", "rec. + rounding loss")), "unit"),
}
_ORDER = ["genie-d", "zeroq", "warm-up calibrate", "sadag refine", "calibrate"]


@dataclass
class StageCurves:
    """Every logged value of one stage: metric -> line (a batch or a unit) -> {iteration: value}."""

    name: str
    kind: _Kind
    lines: dict[str, dict[str, dict[int, float]]] = field(default_factory=lambda: defaultdict(dict))
    order: list[str] = field(default_factory=list)  # line labels in first-seen order

    def add(self, line: str, step: int, rec: dict) -> None:
        if line not in self.order:
            self.order.append(line)
        keys = [k for k, _ in self.kind.metrics] + (["round_loss"] if self.kind.per == "unit" else [])
        for key in keys:  # every key the panels may use: metrics() picks them from what was stored
            if isinstance(rec.get(key), (int, float)):
                self.lines[key].setdefault(line, {})[step] = float(rec[key])  # a resumed run's repeat wins

    def metrics(self) -> tuple[tuple[str, str], ...]:
        """The panels; a loop that reports ``round_loss`` gets a rounding panel instead of the total."""
        if self.kind.per == "unit" and "round_loss" in self.lines:
            return (self.kind.metrics[0], ("round_loss", "rounding regulariser"))
        return self.kind.metrics

    def finals(self, key: str) -> list[float]:
        """The last logged value of every line, in line order."""
        return [pts[max(pts)] for line in self.order if (pts := self.lines[key].get(line))]


def read_curves(metrics_file: Path) -> list[StageCurves]:
    """The stages present in metrics.jsonl, in pipeline order (unreadable lines are skipped)."""
    stages: dict[str, StageCurves] = {}
    starts: dict[tuple[str, str], int] = {}
    for raw in metrics_file.read_text().splitlines() if metrics_file.exists() else []:
        try:
            rec = json.loads(raw)
            stage, step = str(rec["stage"]), int(rec["step"])
        except (ValueError, KeyError, TypeError):
            continue
        unit = _UNIT_STAGE.match(stage)
        name = unit["label"] if unit else stage
        kind = _CALIBRATION.get(name) if unit else _GENERATION.get(name)
        if kind is None:
            continue
        curves = stages.setdefault(name, StageCurves(name, kind))
        if unit:
            curves.add(f"{unit['k']}: {unit['unit']}", step, rec)
            continue
        # generation steps count across batches (and across the batches of a pass): the batch's own iteration, or
        # for a run logged before that was recorded, the axis restarted at each batch's first logged step
        batch = f"batch {int(rec.get('batch', 0))}"
        start = starts.setdefault((name, batch), step)
        curves.add(batch, int(rec["iteration"]) if "iteration" in rec else step - start + 1, rec)
    return [stages[n] for n in _ORDER if n in stages]


def stage_summary(curves: StageCurves, seconds: dict[str, float]) -> str:
    """One line: what the stage did, its final losses, its time."""
    kind = curves.kind
    parts = []
    for key, label in curves.metrics():
        finals = curves.finals(key)
        if not finals:
            continue
        if kind.per == "unit":
            parts.append(f"final {label} per unit {_g(min(finals))} .. {_g(max(finals))} "
                         f"(last unit {_g(finals[-1])})")
        else:
            parts.append(f"final {label} {_g(sum(finals) / len(finals))} (mean over batches)")
    count = f"{len(curves.order)} {kind.per}{'es' if kind.per == 'batch' else 's'}"
    secs = seconds.get(kind.seconds_key)
    took = f", {secs:.1f} s" if isinstance(secs, (int, float)) else ""
    return f"- **{kind.title}**: {count}; " + "; ".join(parts) + f"{took}."


def _g(value: float) -> str:
    return f"{value:.4g}"


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "-" if value is None else str(value)


def report_markdown(report: dict, stages: list[StageCurves] | None = None, curves_png: bool = False) -> str:
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
              f"evaluated on {report.get('eval_images', '-')} images."]
    for key, model in (("fp_nonfinite_images", "full-precision"), ("quant_nonfinite_images", "quantized")):
        if report.get(key):
            lines += ["", f"**The {model} model's outputs hold NaN or infinity for {report[key]} images** (counted "
                      "as misses)."]
    if fp_layers := report.get("fp_layers"):
        lines += ["", f"**Left in full precision** ({bits} does not apply to them): {', '.join(fp_layers)}: "
                  "Conv2d/Linear subclasses that override forward, with no quantized twin registered "
                  "(sadag.quantization.modules.register_quantized_twin)."]
    seconds = report.get("seconds", {})
    if stages:
        lines += ["", "## Stages", ""] + [stage_summary(s, seconds) for s in stages]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines += ["", f"Calibration images: ![calibration images]({GRID})"]
    if curves_png:
        lines += ["", f"Losses, one row per stage: ![loss curves]({CURVES})"]
    return "\n".join(lines) + "\n"


def write_run_report(rundir: RunDir, report: dict, images: Tensor, spec: DataSpec) -> None:
    stages = read_curves(rundir.metrics_file)
    image_grid(images, spec).save(rundir.path(GRID))
    drawn = plot_loss_curves(stages, rundir.path(CURVES))
    atomic_write_text(rundir.path("report.md"), report_markdown(report, stages, curves_png=drawn))


def plot_loss_curves(stages: list[StageCurves], path: Path) -> bool:
    """One row per stage, one panel per loss, one line per batch or unit. False when nothing was drawn
    (no logged losses, or matplotlib, the ``plots`` extra, is missing)."""
    if not stages:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping loss curves (pip install 'sadag[plots]')")
        return False
    cols = max(len(s.metrics()) for s in stages)
    fig, axes = plt.subplots(len(stages), cols, figsize=(5.2 * cols, 3.6 * len(stages)), squeeze=False)
    for row, curves in zip(axes, stages, strict=True):
        metrics = curves.metrics()
        for ax, (key, label) in zip(row, metrics, strict=False):
            _draw_panel(ax, curves, key, label)
        for ax in row[len(metrics):]:
            ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _draw_panel(ax, curves: StageCurves, key: str, label: str) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt

    lines = [(name, curves.lines[key][name]) for name in curves.order if curves.lines[key].get(name)]
    if lines and all(len(pts) == 1 for _, pts in lines):  # one logged point each (short runs): a profile
        lines = [("final value", {i + 1: next(iter(pts.values())) for i, (_, pts) in enumerate(lines)})]
        ax.set_xticks(range(1, len(curves.order) + 1))
        xlabel = curves.kind.per
    else:
        xlabel = f"iteration (per {curves.kind.per})"
    colours = plt.get_cmap("viridis")
    values = []
    for i, (name, pts) in enumerate(lines):
        steps = sorted(pts)
        ys = [pts[s] for s in steps]
        values += ys
        ax.plot(steps, ys, label=name, linewidth=1, marker="." if len(steps) < 4 else None,
                color=colours(i / max(len(lines) - 1, 1)))
    ax.set_title(f"{curves.kind.title}: {label}", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) > 10 * min(positive):
        ax.set_yscale("log")  # the losses span decades
    if lines:
        ax.legend(fontsize=6, ncol=1 + len(lines) // 12, title=curves.kind.per, title_fontsize=6)
