"""The scale-out projection's arithmetic (benchmarks/scaling.py project): the exact and the wide split."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling  # noqa: E402
from sadag.config import CalibConfig  # noqa: E402

COSTS = scaling.StepCosts(genie_step=0.3, refine_step=0.7, calib_step=0.010, calib_fixed=0.006, allreduce=0.001,
                          eval_image=0.002)


def test_one_gpu_is_the_same_under_both_splits() -> None:
    assert scaling.project(COSTS, 10, 1, "sadag", "exact") == scaling.project(COSTS, 10, 1, "sadag", "wide")


def test_the_wide_split_divides_the_launch_bound_step_and_the_exact_one_does_not() -> None:
    iters = CalibConfig().iters
    exact = scaling.project(COSTS, 10, 4, "genie", "exact")
    wide = scaling.project(COSTS, 10, 4, "genie", "wide")
    assert exact["calibrate"] == pytest.approx(10 * iters * (0.006 + 0.004 / 4 + 0.001))
    assert wide["calibrate"] == pytest.approx(10 * iters * (0.010 / 4 + 0.001))
    assert wide["generate"] == exact["generate"] and wide["total"] < exact["total"]
    # SADAG's refinement stays sequential under either split
    assert scaling.project(COSTS, 10, 8, "sadag", "wide")["refine"] == scaling.project(COSTS, 10, 1)["refine"]
