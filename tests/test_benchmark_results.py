"""benchmarks/_common.write_results: a results file keyed by run keeps the rows of the runs not made again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402


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
