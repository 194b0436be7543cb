"""A run's report.md and loss_curves.png: one line and one row of panels per stage that ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sadag import RunConfig, run
from sadag.models import DataSpec
from sadag.reporting import read_curves, report_markdown, write_run_report
from sadag.rundir import RunDir

SPEC = DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10)
REPORT = {"model": "m", "method": "genie", "w_bits": 4, "a_bits": 4, "seed": 0, "preset": "smoke", "num_calib": 8}


@pytest.mark.slow
def test_a_sadag_run_reports_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = run(RunConfig(model="conftest:tiny_bn_model", method="sadag", preset="smoke", out=str(out),
                           device="cpu"), export=False)
    text = (out / "report.md").read_text()
    for title in ("Genie-D", "Warm-up calibration", "SADAG refinement", "Calibration"):
        assert f"**{title}" in text, title
    assert "L_GM (gradient matching)" in text and "final reconstruction loss per unit" in text
    assert f"{report['seconds']['refine']:.1f} s" in text  # the stage's own time on its line
    assert "](loss_curves.png)" in text and "](calibration_grid.png)" in text
    with Image.open(out / "loss_curves.png") as png:
        # four rows of panels (Genie-D, warm-up, refinement, calibration), three columns (SADAG's losses)
        assert png.size == (3 * 520, 4 * 360)
    stages = read_curves(out / "metrics.jsonl")
    calib = stages[-1]
    assert calib.name == "calibrate" and len(calib.order) == len(calib.finals("rec_loss")) == 4  # TinyNet's units
    genie = stages[0]
    assert min(min(p) for p in genie.lines["loss"].values()) == 1  # each batch's axis starts at iteration 1


def _write(rundir: RunDir, records: list[dict]) -> None:
    rundir.metrics_file.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")


def test_report_survives_missing_stages_and_odd_lines(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path / "r", {})
    images = torch.rand(8, 3, 16, 16)
    write_run_report(rundir, {**REPORT, "seconds": {"calibrate": 2.5}}, images, SPEC)  # no metrics at all
    assert not rundir.path("loss_curves.png").exists() and "loss_curves" not in rundir.path("report.md").read_text()
    _write(rundir, [
        {"stage": "calibrate unit 1/2 (conv1)", "step": 10, "total": 20, "rec_loss": 0.5, "loss": 900.0},
        {"stage": "calibrate unit 1/2 (conv1)", "step": 20, "total": 20, "rec_loss": 0.25, "loss": 0.3},
        {"stage": "calibrate unit 2/2 (fc)", "step": 20, "total": 20, "rec_loss": 0.125, "loss": 0.2},
        {"stage": "evaluate FP", "step": 1, "total": 1},  # no losses: not a curve
        {"step": 3},  # no stage: skipped
    ])
    write_run_report(rundir, {**REPORT, "seconds": {"calibrate": 2.5}}, images, SPEC)
    text = rundir.path("report.md").read_text()
    assert "- **Calibration**: 2 units; final reconstruction loss per unit 0.125 .. 0.25 (last unit 0.125)" in text
    assert text.count("- **") == 1 and "2.5 s." in text
    with Image.open(rundir.path("loss_curves.png")) as png:
        assert png.size == (2 * 520, 360)
    assert "## Stages" not in report_markdown({**REPORT, "seconds": {}}, [])


def test_metrics_reach_the_host_in_one_dtype_the_device_has() -> None:
    """Progress metrics are stacked on their device before one host sync: in float64, except on Apple's MPS,
    which has none (a float64 conversion there raised at the first progress report)."""
    from sadag.progress import host_floats, widest_float

    assert widest_float(torch.device("mps")) == torch.float32
    assert widest_float(torch.device("cpu")) == widest_float(torch.device("cuda")) == torch.float64
    out = host_floats({"loss": torch.tensor(0.25), "lr": 0.1, "step": torch.tensor(3)})
    assert out == {"loss": 0.25, "lr": 0.1, "step": 3.0} and list(out) == ["loss", "lr", "step"]


def test_batches_of_one_pass_are_drawn_against_their_own_iterations(tmp_path: Path) -> None:
    """Two batches optimized in one pass log steps that count both (1, 2 at iteration 1; 21, 22 at 11): each
    batch's curve is drawn against its own iteration, not stretched over the pass."""
    rundir = RunDir(tmp_path / "r", {})
    _write(rundir, [{"stage": "genie-d", "step": 2 * it + b + 1, "total": 40, "batch": b, "iteration": it + 1,
                     "loss": 1.0 / (it + 1)} for it in (0, 10, 19) for b in (0, 1)])
    genie = read_curves(rundir.metrics_file)[0]
    assert {batch: sorted(points) for batch, points in genie.lines["loss"].items()} == \
        {"batch 0": [1, 11, 20], "batch 1": [1, 11, 20]}


def test_a_unit_that_logs_its_rounding_loss_gets_that_panel(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path / "r", {})
    _write(rundir, [{"stage": "calibrate unit 1/1 (fc)", "step": s, "total": 20, "rec_loss": 0.5 / s,
                     "loss": 9.0 / s, "round_loss": 8.0 / s} for s in (10, 20)])
    calib = read_curves(rundir.metrics_file)[0]
    assert [k for k, _ in calib.metrics()] == ["rec_loss", "round_loss"]
    assert calib.finals("round_loss") == [0.4]


def test_progress_eta_counts_only_this_processs_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from sadag import progress

    clock = iter([0.0, 100.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    printer = progress.ProgressPrinter(out, min_interval=0.0)
    printer("genie-d", 28_000, 32_000, {})  # resumed: 28,000 steps were done before this process
    printer("genie-d", 28_100, 32_000, {})  # 100 steps in 100 s: 3,900 s to go
    assert out.getvalue().splitlines()[-1].startswith("genie-d [#################---] 28100/32000 100s<3900s")


def test_evaluate_keeps_the_callers_modes() -> None:
    from sadag import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.BatchNorm1d(6)).train()
    model[1].eval()
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3]))]
    assert evaluate(model, batches)["num_images"] == 4
    assert model.training and not model[1].training and model[2].training


def test_evaluate_counts_nonfinite_outputs_as_misses() -> None:
    """topk ranks a NaN first: a NaN row that happened to "hit" its label must not count as correct."""
    from sadag import evaluate

    class Logits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.one_hot(torch.arange(x.shape[0]) % 6, 6).float()
            out[0, 0] = float("nan")  # NaN where the label is: topk picks it
            out[1, 3] = float("inf")
            return out

    batches = [(torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 2, 3]))]
    metrics = evaluate(Logits(), batches)
    assert metrics["nonfinite_images"] == 2 and metrics["top1"] == 50.0 and metrics["top5"] == 50.0


class HalvedConv(torch.nn.Conv2d):
    """A conv subclass with its own forward and no quantized twin: left in full precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 2


def fp_head_model():  # noqa: ANN201
    """A factory for `--model test_reporting:fp_head_model`: TinyNet whose head conv stays in FP."""
    from conftest import tiny_bn_model

    model, spec = tiny_bn_model()
    model.head[0] = HalvedConv(8, 16, 3, stride=2, padding=1)
    return model.eval(), spec


def test_layers_left_in_fp_are_named_in_the_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = run(RunConfig(model="test_reporting:fp_head_model", method="noise", preset="smoke", out=str(out),
                           device="cpu"), export=False)
    assert report["fp_layers"] == ["head.0"] == json.loads((out / "report.json").read_text())["fp_layers"]
    assert "**Left in full precision** (W4A4 does not apply to them): head.0: Conv2d/Linear subclasses" in \
        (out / "report.md").read_text()
    assert "Left in full precision" not in report_markdown({**REPORT, "fp_layers": [], "seconds": {}})
