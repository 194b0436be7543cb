"""The budget frontier's points (benchmarks/frontier.py): fixed budgets whose names keep their meaning, one of
them the fast preset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sadag.config import PRESETS, apply_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frontier  # noqa: E402


@pytest.mark.parametrize("point", list(frontier.POINTS))
def test_a_point_is_the_base_budget_with_its_own_knobs_moved(point: str, tmp_path: Path) -> None:
    cfg = apply_preset(frontier.point_config("resnet20_cifar10", point, "2/4", 3, "sadag", tmp_path))
    assert (cfg.quant.w_bits, cfg.quant.a_bits, cfg.seed, cfg.method) == (2, 4, 3, "sadag")
    moved = {f"{section}.{k}": v for section, values in frontier.POINTS[point].items() for k, v in values.items()}
    for section, values in frontier.BASE.items():
        for key, value in values.items():
            expected = moved.get(f"{section}.{key}", value)
            assert getattr(getattr(cfg, section), key) == expected, f"{point}: {section}.{key}"
    assert Path(cfg.out).parent == tmp_path / "frontier" / "resnet20_cifar10"


def test_the_base_sets_every_knob_of_the_preset_so_a_moved_preset_moves_no_point() -> None:
    for section, values in PRESETS["fast"].items():
        assert set(values) <= set(frontier.BASE[section]), section


def test_the_fast_preset_is_the_frontier_point_it_was_chosen_from() -> None:
    budget = frontier.point_budget(frontier.FAST_POINT)
    for section, values in PRESETS["fast"].items():
        assert {k: budget[section][k] for k in values} == values, section


def test_a_row_names_its_machine_and_the_calibration_its_run_used(tmp_path: Path) -> None:
    """Rows of several sessions share one file: each says where it ran and how it calibrated, the engine as the
    run resolved "auto" (its marker), not as typed."""
    import json

    import yaml

    import _common

    cfg = frontier.point_config("resnet20_cifar10", "genie100", "2/4", 3, "sadag", tmp_path)
    out = Path(cfg.out)
    out.mkdir(parents=True)
    calib = {"iters": 2000, "batch_size": 32, "engine": "auto", "drop_draw": "bytes"}
    (out / "config.yaml").write_text(yaml.safe_dump({"calib": calib, "gen": {}}))
    (out / "sadag-run.json").write_text(json.dumps({"settings": {"calib.engine": "fused"}}))
    report = {"quant_top1": 70.0, "seconds": {"generate": 1.0, "calibrate": 2.5}}
    row = frontier.point_row(cfg, "genie100", "2/4", report)
    assert row["machine"] == _common.machine()
    calibration = (row["engine"], row["drop_draw"], row["calib_batch_size"], row["calib_iters"])
    assert calibration == ("fused", "bytes", 32, 2000)
    assert (row["point"], row["bits"], row["seed"], row["top1"], row["total_s"]) == ("genie100", "2/4", 3, 70.0, 3.5)
    (out / "sadag-run.json").unlink()  # a run made before the marker recorded the resolved engine
    assert frontier.point_row(cfg, "genie100", "2/4", report)["engine"] == "auto"
