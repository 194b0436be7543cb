"""The budget frontier's points (benchmarks/frontier.py): each is the fast preset with only its own knobs moved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sadag.config import PRESETS, apply_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frontier  # noqa: E402


@pytest.mark.parametrize("point", list(frontier.POINTS))
def test_a_point_is_the_fast_preset_with_its_own_knobs_moved(point: str, tmp_path: Path) -> None:
    cfg = apply_preset(frontier.point_config("resnet20_cifar10", point, "2/4", 3, "sadag", tmp_path))
    assert (cfg.quant.w_bits, cfg.quant.a_bits, cfg.seed, cfg.method) == (2, 4, 3, "sadag")
    moved = {f"{section}.{k}": v for section, values in frontier.POINTS[point].items() for k, v in values.items()}
    for section, values in PRESETS["fast"].items():
        for key, value in values.items():
            expected = moved.get(f"{section}.{key}", value)
            assert getattr(getattr(cfg, section), key) == expected, f"{point}: {section}.{key}"
    assert Path(cfg.out).parent == tmp_path / "frontier" / "resnet20_cifar10"


def test_results_keep_the_rows_of_other_points_and_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frontier, "RESULTS", tmp_path)
    row = {"method": "sadag", "point": "fast", "bits": "4/4", "seed": 0, "top1": 79.4}
    (tmp_path / "frontier_m.json").write_text(json.dumps({"meta": {}, "rows": [row, {**row, "seed": 1}]}))
    rows = frontier.merged("m", [{**row, "top1": 79.5}, {**row, "point": "fast-old"}])
    assert sorted((r["point"], r["seed"], r["top1"]) for r in rows) == [("fast", 0, 79.5), ("fast", 1, 79.4),
                                                                        ("fast-old", 0, 79.4)]
