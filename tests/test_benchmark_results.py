"""The benchmark scripts' own logic, without running a benchmark: results files keyed by run, the wide split,
real-data and saved-set checks, argument validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402
import real_data  # noqa: E402
import throughput  # noqa: E402
import zero_shot  # noqa: E402
from sadag import DataSpec  # noqa: E402
from sadag.config import PRESETS  # noqa: E402
from sadag.generation import save_synthetic_set  # noqa: E402


def test_a_keyed_write_keeps_other_runs_and_replaces_the_same_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    row = {"method": "sadag", "point": "fast", "bits": "4/4", "seed": 0, "top1": 79.4}
    (tmp_path / "f.json").write_text(json.dumps({"meta": {}, "rows": [row, {**row, "seed": 1}]}))
    key = ("method", "point", "bits", "seed")
    _common.write_results("f", [{**row, "top1": 79.5}, {**row, "point": "fast-old"}], {}, key=key)
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert sorted((r["point"], r["seed"], r["top1"]) for r in rows) == [("fast", 0, 79.5), ("fast", 1, 79.4),
                                                                        ("fast-old", 0, 79.4)]


def test_an_unkeyed_write_replaces_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    _common.write_results("f", [{"seed": 0}], {})
    _common.write_results("f", [{"seed": 1}], {})
    assert json.loads((tmp_path / "f.json").read_text())["rows"] == [{"seed": 1}]


def test_the_wide_split_keeps_the_images_and_refuses_a_split_that_would_drop_some() -> None:
    assert _common.wide_split(2000, 32, 2) == (1000, 64)
    with pytest.raises(ValueError, match="2001 iterations over 2 ranks"):
        _common.wide_split(2001, 32, 2)


def test_real_data_refuses_a_model_it_has_no_training_images_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert real_data.training_images("resnet20_cifar10") == _common.CIFAR_TRAIN
    monkeypatch.setattr(sys, "argv", ["real_data.py", "--model", "efficientnet_lite0"])
    with pytest.raises(SystemExit, match="efficientnet_lite0 needs its real training images"):
        real_data.main()


def test_the_real_set_of_a_budget_has_as_many_images_as_its_synthetic_sets() -> None:
    preset = PRESETS[zero_shot.PRESET]["gen"]["num_images"]
    assert zero_shot.budget_gen("fast", "real")["num_images"] == zero_shot.budget_gen("fast", "genie")["num_images"]
    assert zero_shot.budget_gen("fast", "real")["num_images"] == preset
    assert zero_shot.budget_gen("cpu-lite", "real")["num_images"] == 128


def test_a_saved_set_made_with_other_settings_than_its_budget_is_refused(tmp_path: Path) -> None:
    expected = zero_shot.budget_gen("smoke", "genie")
    spec = DataSpec(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_classes=10)
    images = torch.zeros(expected["num_images"], 3, 8, 8)
    save_synthetic_set(tmp_path / "same", images, spec, {"gen": expected})
    zero_shot.check_set(tmp_path / "same", expected)
    save_synthetic_set(tmp_path / "old", images, spec, {"gen": {**expected, "genie_iters": 7, "new": 1}})
    with pytest.raises(SystemExit, match=r"gen.genie_iters 7 in the set, 5 in the budget.*delete that folder"):
        zero_shot.check_set(tmp_path / "old", expected)
    save_synthetic_set(tmp_path / "real", images[:4], spec, {"method": "real"})  # a real set records no gen
    with pytest.raises(SystemExit, match="gen.num_images 4 in the set"):
        zero_shot.check_set(tmp_path / "real", expected)


@pytest.mark.parametrize("flag", ["--units", "--repeats", "--unit-repeats"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_throughput_refuses_a_count_below_one_at_parsing(flag: str, value: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args([flag, value])
    assert f"{flag}: must be at least 1, got {value}" in capsys.readouterr().err
    assert throughput.parse_args([flag, "2"]).__dict__[flag[2:].replace("-", "_")] == 2
