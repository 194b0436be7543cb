"""The paired protocol's statistics (benchmarks/protocol.py): t quantiles, intervals, pairing by seed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import protocol  # noqa: E402


def _t_cdf(q: float, df: int, steps: int = 4000) -> float:
    """P(T <= q) for Student's t by Simpson's rule on the density (no scipy)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = q / steps
    inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + h / 3 * (pdf(0.0) + inner + pdf(q))


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 60, 120, 1000])
def test_t_quantiles_are_the_975_and_80_points(df: int) -> None:
    assert _t_cdf(protocol.t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-6 if df <= 30 else 2e-5)
    assert _t_cdf(protocol.t_quantile_80(df), df) == pytest.approx(0.80, abs=2e-6 if df <= 30 else 2e-5)


def test_summary_of_known_differences() -> None:
    s = protocol.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(2.5)
    se = sd / math.sqrt(5)
    assert (s["n"], s["mean"]) == (5, 3.0)
    assert s["sd"] == pytest.approx(sd) and s["se"] == pytest.approx(se)
    assert s["lo"] == pytest.approx(3.0 - 2.776445 * se, abs=1e-6)
    assert s["hi"] == pytest.approx(3.0 + 2.776445 * se, abs=1e-6)
    # 80% power at n = 5: (t_0.975,4 + t_0.80,4) SE, not the 2 SE that the interval would not even exclude zero at
    assert s["detectable"] == pytest.approx((2.776445 + 0.940965) * se, abs=1e-6)
    one = protocol.summarize([0.4])
    assert one["mean"] == 0.4 and one["lo"] is None and protocol.format_summary(one) == "+0.40 (n=1)"
    assert protocol.format_summary(protocol.summarize([])) == "-"
    with pytest.raises(ValueError, match="degrees of freedom"):
        protocol.t_quantile_975(0)


def _power_at_detectable(n: int, steps: int = 4000, top: float = 12.0) -> float:
    """The exact power of the two-sided 95% t-test when the true difference is summarize's "detectable":
    P(|Z + d| > t S) over Z normal and S the ratio of the sample SD to the true one (a chi density)."""
    df = n - 1
    t, d = protocol.t_quantile_975(df), protocol.t_quantile_975(df) + protocol.t_quantile_80(df)
    log_k = math.log(2) + df / 2 * math.log(df / 2) - math.lgamma(df / 2)

    def integrand(s: float) -> float:
        density = math.exp(log_k + (df - 1) * math.log(s) - df * s * s / 2) if s > 0 else math.exp(log_k) * (df == 1)
        return density * (0.5 * math.erfc((t * s - d) / math.sqrt(2)) + 0.5 * math.erfc((t * s + d) / math.sqrt(2)))

    h = top / steps
    return h / 3 * (integrand(0.0) + integrand(top) + sum((4 if i % 2 else 2) * integrand(i * h)
                                                          for i in range(1, steps)))


@pytest.mark.parametrize(("n", "power"), [(2, 0.73), (3, 0.77), (4, 0.78), (5, 0.79), (10, 0.80)])
def test_detectable_is_found_about_four_times_in_five_as_documented(n: int, power: float) -> None:
    """(t_0.975 + t_0.80) SE is the usual approximation: its exact power is below 80% at small n (summarize's
    docstring gives these numbers)."""
    assert _power_at_detectable(n) == pytest.approx(power, abs=0.005)
    if n in (2, 5):
        assert f"{round(power * 100)}% at n = {n}" in " ".join(protocol.summarize.__doc__.split())


def test_differences_are_paired_by_seed_and_bits() -> None:
    def row(method: str, seed: int, top1: float, bits: str = "4/4") -> dict:
        return {"method": method, "seed": seed, "top1": top1, "bits": bits}

    rows = [row("genie", 0, 80.0), row("genie", 1, 70.0), row("genie", 2, 75.0),
            row("sadag", 1, 71.0), row("sadag", 0, 80.5), row("sadag", 3, 99.0),  # seed 3 has no genie partner
            row("sadag", 0, 10.0, "2/4"), row("real", 2, 76.0)]
    assert protocol.paired_differences(rows, "sadag", "4/4") == [0.5, 1.0]
    assert protocol.paired_differences(rows, "real", "4/4") == [1.0]
    assert protocol.paired_differences(rows, "sadag", "2/4") == []
    table = protocol.tables(rows)
    assert "| real (headroom) | +1.00 (n=1)" in table and "| sadag | +0.75 ± 0.35 (n=2)" in table


def test_the_plan_runs_genie_first_real_last_and_waits_for_the_genie_set(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(methods=["real", "sadag", "genie-lowpass", "genie"], seeds=[0, 1], bits=["2/2"],
                              work=str(tmp_path), model="resnet20_cifar10", genie_from=None)
    order = [(m, s) for _, m, s in protocol.plan(args)]
    assert order == [("genie", 0), ("sadag", 0), ("genie-lowpass", 0), ("genie", 1), ("sadag", 1),
                     ("genie-lowpass", 1), ("real", 0), ("real", 1)]
    assert all(protocol.ready(("2/2", m, 1), set(), args) for m in ("real", "genie", "genie-setbn"))
    assert not protocol.ready(("2/2", "sadag", 1), set(), args)
    assert protocol.ready(("2/2", "sadag", 1), {("2/2", "genie", 1)}, args)
    finished = protocol.run_dir(tmp_path, "resnet20_cifar10", "2/2", "genie", 0)  # its set is written
    (finished / "synthetic").mkdir(parents=True)
    assert not protocol.ready(("2/2", "genie-lowpass", 0), set(), args)
    (finished / "synthetic" / "images.pt").write_bytes(b"")
    assert protocol.ready(("2/2", "genie-lowpass", 0), set(), args)
    config = protocol.run_config(argparse.Namespace(**vars(args), num_images=256, gen_batch=128, genie_iters=300,
                                                    refine_iters=200, warmup_iters=500, calib_iters=2000,
                                                    engine="eager", drop_draw="uniform", lowpass=None,
                                                    real_data=None, device="cpu", eval_limit=None), "2/2", "sadag",
                                 0, 32)
    assert config.gen.genie_set == str(finished / "synthetic") and config.gen.neighbor == "released"


def test_genie_at_other_bits_can_reuse_one_genie_set(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(work=str(tmp_path), model="resnet20_cifar10", genie_from="2/2", num_images=256,
                              gen_batch=128, genie_iters=300, refine_iters=200, warmup_iters=500, calib_iters=2000,
                              engine="eager", drop_draw="uniform", lowpass=None, real_data=None, device="cpu",
                              eval_limit=None)
    source = protocol.run_dir(tmp_path, "resnet20_cifar10", "2/2", "genie", 3) / "synthetic"
    assert protocol.genie_source(args, "4/4", "genie") == "2/2"
    assert protocol.genie_source(args, "2/2", "genie") is None  # the source run makes its own set
    assert protocol.genie_source(args, "4/4", "genie-lowpass") == "4/4"  # paired with its own bits' genie run
    assert protocol.genie_source(args, "4/4", "real") is None
    assert not protocol.ready(("4/4", "genie", 3), set(), args)
    assert protocol.ready(("4/4", "genie", 3), {("2/2", "genie", 3)}, args)
    with pytest.raises(SystemExit, match="genie run at 2/2 of that seed: add genie and 2/2"):
        protocol._missing_genie(("4/4", "genie", 3), args)
    assert protocol.run_config(args, "4/4", "genie", 3, 32).gen.genie_set == str(source)
    assert protocol.run_config(args, "2/2", "genie", 3, 32).gen.genie_set is None


def test_a_row_names_the_run_whose_genie_set_it_started_from(tmp_path: Path) -> None:
    import json

    import yaml

    run = tmp_path / "w4a4_genie_s3"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"model": "resnet20_cifar10", "quant_top1": 79.9, "num_calib": 256}))
    source = tmp_path / "w2a2_genie_s3" / "synthetic"
    (run / "config.yaml").write_text(yaml.safe_dump({"calib": {"iters": 2000}, "gen": {"genie_set": str(source)}}))
    row = protocol.row_of(run, "4/4", "genie", 3)
    assert (row["top1"], row["calib_iters"], row["genie_set_of"]) == (79.9, 2000, "w2a2_genie_s3")
    (run / "config.yaml").write_text(yaml.safe_dump({"calib": {"iters": 2000}, "gen": {"genie_set": None}}))
    assert protocol.row_of(run, "4/4", "genie", 3)["genie_set_of"] is None


def test_the_wide_variant_calibrates_the_genie_set_with_the_same_images_per_unit(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(work=str(tmp_path), model="resnet20_cifar10", genie_from="2/2", num_images=256,
                              gen_batch=128, genie_iters=300, refine_iters=200, warmup_iters=500, calib_iters=2000,
                              engine="eager", drop_draw="uniform", lowpass=None, real_data=None, device="cpu",
                              eval_limit=None)
    wide, plain, draw, fused = (protocol.run_config(args, "4/4", m, 1, 32)
                                for m in ("genie-wide", "genie", "genie-bytes", "genie-fused"))
    assert (plain.calib.drop_draw, draw.calib.drop_draw, wide.calib.drop_draw) == ("uniform", "bytes", "uniform")
    assert (plain.calib.engine, fused.calib.engine, fused.calib.drop_draw) == ("eager", "fused", "uniform")
    assert fused.gen.genie_set == wide.gen.genie_set  # the 4/4 genie run's set, as every calibration variant
    assert (draw.calib.iters, draw.calib.batch_size) == (plain.calib.iters, plain.calib.batch_size)
    assert (wide.calib.batch_size, wide.calib.iters) == (64, 1000)
    assert (plain.calib.batch_size, plain.calib.iters) == (32, 2000)
    assert wide.calib.batch_size * wide.calib.iters == plain.calib.batch_size * plain.calib.iters
    # paired with the genie run of its own bits, never a set made for it
    assert wide.gen.genie_set == str(protocol.run_dir(tmp_path, "resnet20_cifar10", "4/4", "genie", 1) / "synthetic")


def test_sadag_pass_refines_every_batch_at_once_and_pairs_with_sadag(tmp_path: Path) -> None:
    import argparse

    args = argparse.Namespace(work=str(tmp_path), model="resnet20_cifar10", genie_from=None, num_images=256,
                              gen_batch=128, genie_iters=300, refine_iters=200, warmup_iters=500, calib_iters=2000,
                              engine="eager", drop_draw="uniform", lowpass=None, real_data=None, device="cpu",
                              eval_limit=None)
    one_pass, sequential = (protocol.run_config(args, "2/2", m, 1, 32) for m in ("sadag-pass", "sadag"))
    assert (one_pass.gen.refine_parallel, sequential.gen.refine_parallel) == (2, 1)
    assert one_pass.gen.genie_set == sequential.gen.genie_set  # the same genie set: paired exactly
    rows = [{"bits": "2/2", "method": m, "seed": s, "top1": top1}
            for m, tops in (("genie", (60.0, 61.0, 62.0)), ("sadag", (60.5, 61.0, 63.0)),
                            ("sadag-pass", (61.5, 61.5, 62.0)))
            for s, top1 in enumerate(tops)]
    assert protocol.paired_differences(rows, "sadag-pass", "2/2", "sadag") == [1.0, 0.5, -1.0]
    table = protocol.tables(rows)
    assert "| sadag-pass minus sadag | +0.17 ± 1.04 (n=3)" in table
    assert "| sadag-pass | +0.67" in table  # and against genie, as every method


def _finished_run(work: Path, bits: str, method: str, seed: int, top1: float, iters: int = 2000,
                  device: str = "cpu", env: dict | None = None, genie_set: Path | None = None, engine: str = "eager",
                  **report: object) -> None:
    """A run directory as a finished protocol run leaves it: report.json (plus ``report``'s fields) and its
    config.yaml (engine as typed, ``genie_set`` if it started from one), and environment.json if ``env`` is given."""
    import yaml

    run = protocol.run_dir(work, "resnet20_cifar10", bits, method, seed)
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"model": "resnet20_cifar10", "quant_top1": top1, "num_calib": 256,
                                                 "device": device, **report}))
    if env is not None:
        (run / "environment.json").write_text(json.dumps(env))
    gen = {"genie_iters": 300, **({"genie_set": str(genie_set)} if genie_set else {})}
    (run / "config.yaml").write_text(yaml.safe_dump({"calib": {"iters": iters, "batch_size": 32, "engine": engine},
                                                     "gen": gen}))


def test_collect_reads_every_finished_run_and_its_budget_whatever_the_arguments(tmp_path: Path) -> None:
    import argparse

    _finished_run(tmp_path, "2/2", "genie", 0, 60.0, engine="auto")
    _finished_run(tmp_path, "4/4", "genie-lowpass", 3, 63.0, engine="auto")
    _finished_run(tmp_path, "2/2", "sadag", 1, 61.0, iters=500, engine="auto")
    protocol.run_dir(tmp_path, "resnet20_cifar10", "2/2", "sadag", 2).mkdir()  # unfinished: no report
    (tmp_path / "protocol" / "resnet20_cifar10" / "w2a2_unknown_s0").mkdir()
    args = argparse.Namespace(work=str(tmp_path), model="resnet20_cifar10", bits=["4/4"], seeds=[0],
                              methods=["genie"])
    rows = protocol.finished_rows(args)
    assert sorted((r["bits"], r["method"], r["seed"]) for r in rows) == [
        ("2/2", "genie", 0), ("2/2", "sadag", 1), ("4/4", "genie-lowpass", 3)]
    budgets = protocol.runs_budget(rows)
    assert sorted((b["calib_iters"], b["runs"]) for b in budgets) == [(500, 1), (2000, 2)]
    marker = protocol.run_dir(tmp_path, "resnet20_cifar10", "2/2", "sadag", 1) / "sadag-run.json"
    marker.write_text(json.dumps({"settings": {"calib.engine": "fused"}}))  # what the run resolved auto to
    engines = {(r["method"], r["seed"]): r["engine"] for r in protocol.finished_rows(args)}
    assert engines == {("genie", 0): "auto", ("sadag", 1): "fused", ("genie-lowpass", 3): "auto"}


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty results folder in place of benchmarks/results."""
    import _common

    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(protocol, "RESULTS", folder)
    monkeypatch.setattr(_common, "RESULTS", folder)
    return folder


def _recorded_row(method: str, seed: int, top1: float, **extra: object) -> dict:
    """A row as an earlier collect wrote it to the results file."""
    return {"model": "resnet20_cifar10", "bits": "2/2", "method": method, "seed": seed, "top1": top1,
            "num_images": 256, "calib_iters": 2000, "calib_batch_size": 32, "drop_draw": "uniform",
            "engine": "eager", "gen": {"genie_iters": 300}, **extra}


def _collect(work: Path, deterministic: bool = False) -> dict:
    import argparse

    args = argparse.Namespace(work=str(work), model="resnet20_cifar10", tag="", deterministic=deterministic,
                              probe=False)
    return json.loads(protocol.collect(args).read_text())


def test_collect_keeps_the_recorded_rows_of_runs_not_in_the_work_folder(tmp_path: Path, results: Path) -> None:
    recorded = [_recorded_row("genie", s, 60.0 + s) for s in range(3)] + [_recorded_row("real", 0, 70.0)]
    probe = [{"bits": "2/2", "seed": 0, "set": "genie", "cos": 0.5}]
    (results / "protocol_resnet20_cifar10.json").write_text(json.dumps({"meta": {"probe": probe},
                                                                        "rows": recorded}))
    work = tmp_path / "work"
    _finished_run(work, "2/2", "genie", 1, 61.5)  # run again here: replaces the recorded row
    _finished_run(work, "2/2", "real", 1, 65.0)
    _finished_run(work, "2/2", "real", 3, 66.0)  # no genie run of seed 3 anywhere
    written = _collect(work)
    assert sorted(((r["method"], r["seed"]), r["top1"]) for r in written["rows"]) == [
        (("genie", 0), 60.0), (("genie", 1), 61.5), (("genie", 2), 62.0), (("real", 0), 70.0),
        (("real", 1), 65.0), (("real", 3), 66.0)]
    paired = written["meta"]["paired"]["real 2/2"]
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(((70 - 60) + (65 - 61.5)) / 2)
    assert written["meta"]["probe"] == probe


def test_collect_reads_determinism_from_the_runs_not_from_its_own_flags(tmp_path: Path, results: Path) -> None:
    recorded = _recorded_row("real", 0, 70.0, device="cpu")  # written before rows said whether they repeat
    (results / "protocol_resnet20_cifar10.json").write_text(json.dumps({"meta": {}, "rows": [recorded]}))
    work = tmp_path / "work"
    _finished_run(work, "2/2", "genie", 0, 60.0)  # a CPU run, with or without environment.json
    _finished_run(work, "2/2", "genie", 1, 61.0, device="cuda:0", env={"deterministic_algorithms": True})
    written = _collect(work)
    assert [r["deterministic"] for r in written["rows"]] == [True, True, True]
    assert written["meta"]["deterministic"] is True  # though this collect was not given --deterministic
    _finished_run(work, "2/2", "sadag", 1, 61.0, device="cuda:0", env={"deterministic_algorithms": False})
    _finished_run(work, "2/2", "sadag", 0, 61.0, device="cuda:0", env={})  # made before the flag was recorded
    written = _collect(work, deterministic=True)
    assert {r["seed"]: r["deterministic"] for r in written["rows"] if r["method"] == "sadag"} == {0: None, 1: False}
    assert written["meta"]["deterministic"] is False


def test_collect_pairs_a_run_with_its_genie_row_only_if_it_started_from_those_images(tmp_path: Path,
                                                                                     results: Path) -> None:
    work = tmp_path / "work"

    def genie_set(seed: int) -> Path:
        return protocol.run_dir(work, "resnet20_cifar10", "2/2", "genie", seed) / "synthetic"

    for seed, digest in ((0, "aaaa"), (1, "bbbb"), (2, None)):  # seed 2's genie run predates digests
        _finished_run(work, "2/2", "genie", seed, 60.0, calib_digest=digest)
    _finished_run(work, "2/2", "sadag", 0, 61.0, genie_set=genie_set(0), genie_set_digest="aaaa")  # its set
    _finished_run(work, "2/2", "sadag", 1, 65.0, genie_set=genie_set(1), genie_set_digest="cccc")  # made again
    _finished_run(work, "2/2", "sadag", 2, 62.0, genie_set=genie_set(2), genie_set_digest="dddd")
    _finished_run(work, "2/2", "real", 1, 70.0, calib_digest="eeee")  # pairs by seed alone
    written = _collect(work)
    assert written["meta"]["pairs"] == {"verified": 1, "unverified": 1, "broken": [["2/2", "sadag", 1]],
                                        "genie_from_mismatch": []}
    assert written["meta"]["paired"]["sadag 2/2"]["n"] == 2  # seeds 0 and 2: seed 1 is no pair
    assert written["meta"]["paired"]["sadag 2/2"]["unverified"] == 1  # seed 2's, counted in its cell
    assert written["meta"]["paired"]["real 2/2"]["n"] == 1
    assert {r["seed"] for r in written["rows"] if r["method"] == "sadag"} == {0, 1, 2}  # the row itself is kept


def test_a_genie_row_made_from_another_bits_set_is_no_pair_and_drops_none(tmp_path: Path, results: Path) -> None:
    """--genie-from: genie at 4/4 calibrates the 2/2 genie run's set. If its digest says otherwise, that is
    reported, and the 4/4 pairs, verified against the 4/4 genie row's own images, stay."""
    work = tmp_path / "work"
    _finished_run(work, "2/2", "genie", 0, 60.0, calib_digest="aaaa")
    two_bit_set = protocol.run_dir(work, "resnet20_cifar10", "2/2", "genie", 0) / "synthetic"
    _finished_run(work, "4/4", "genie", 0, 80.0, genie_set=two_bit_set, genie_set_digest="bbbb", calib_digest="bbbb")
    four_bit_set = protocol.run_dir(work, "resnet20_cifar10", "4/4", "genie", 0) / "synthetic"
    _finished_run(work, "4/4", "sadag", 0, 81.0, genie_set=four_bit_set, genie_set_digest="bbbb")
    written = _collect(work)
    assert written["meta"]["pairs"] == {"verified": 1, "unverified": 0, "broken": [],
                                        "genie_from_mismatch": [["4/4", "genie", 0]]}
    assert written["meta"]["paired"]["sadag 4/4"]["n"] == 1


def test_a_row_records_the_machine_its_run_says_it_ran_on(tmp_path: Path) -> None:
    env = {"host": "node-a", "cpu_model": "AMD EPYC", "threads": 1, "torch": "2.13.0", "cpu_count": 2}
    _finished_run(tmp_path, "2/2", "genie", 0, 60.0, env=env)
    _finished_run(tmp_path, "2/2", "genie", 1, 60.0, env={"threads": 2, "torch": "2.12.0"})  # before host was
    _finished_run(tmp_path, "2/2", "genie", 2, 60.0)  # before environment.json
    rows = [protocol.row_of(protocol.run_dir(tmp_path, "resnet20_cifar10", "2/2", "genie", s), "2/2", "genie", s)
            for s in range(3)]
    assert [r["machine"] for r in rows] == [
        {"host": "node-a", "cpu_model": "AMD EPYC", "threads": 1, "torch": "2.13.0"},
        {"host": None, "cpu_model": None, "threads": 2, "torch": "2.12.0"},
        dict.fromkeys(("host", "cpu_model", "threads", "torch"))]


def test_each_cell_counts_its_cross_machine_pairs_and_keeps_them(tmp_path: Path, results: Path, capsys) -> None:  # noqa: ANN001
    here = {"host": "node-a", "cpu_model": "AMD EPYC", "threads": 1, "torch": "2.13.0"}
    elsewhere = {**here, "host": "node-b"}
    recorded = [_recorded_row("genie", 0, 60.0, machine=here), _recorded_row("sadag", 0, 61.0, machine=elsewhere),
                _recorded_row("genie", 1, 60.0, machine=here), _recorded_row("sadag", 1, 62.0, machine=here),
                _recorded_row("genie", 2, 60.0, machine=here), _recorded_row("sadag", 2, 63.0),  # machine unknown
                _recorded_row("genie", 3, 60.0, machine={**here, "host": None}),
                _recorded_row("sadag", 3, 64.0, machine=elsewhere),  # a run made before hosts were recorded
                _recorded_row("real", 0, 70.0, machine={**here, "threads": 2})]
    (results / "protocol_resnet20_cifar10.json").write_text(json.dumps({"meta": {}, "rows": recorded}))
    written = _collect(tmp_path / "work")
    paired = written["meta"]["paired"]
    assert (paired["sadag 2/2"]["n"], paired["sadag 2/2"]["cross_machine"]) == (4, 1)
    assert paired["sadag 2/2"]["mean"] == pytest.approx(2.5)  # the cross-machine pair is in the difference
    assert paired["real 2/2"]["cross_machine"] == 1  # another thread count rounds differently too
    assert paired["genie-lowpass 2/2"] == {**protocol.summarize([]), "unverified": 0, "cross_machine": 0}
    out = capsys.readouterr().out
    assert "note: sadag 2/2: 1 of its 4 pairs ran on two machines" in out and "note: real 2/2: 1 of its 1" in out


def _row(method: str, seed: int, **budget) -> dict:  # noqa: ANN003
    row = {"method": method, "bits": "2/2", "seed": seed, "top1": 60.0, "num_images": 256, "eval_images": 10000,
           "calib_iters": 2000, "calib_batch_size": 32, "gen": {"genie_iters": 300}}
    return {**row, **budget}


def test_one_results_file_holds_one_budget() -> None:
    """Rows pair by seed alone: a 1,024-image genie row must not pair with (or replace) a 256-image one."""
    protocol.check_one_budget([_row("genie", 0), _row("real", 0), _row("genie-wide", 0, calib_iters=1000,
                                                                       calib_batch_size=64)])
    for change in ({"num_images": 1024}, {"eval_images": 1000}, {"calib_iters": 500},
                   {"gen": {"genie_iters": 1000}}):
        with pytest.raises(SystemExit, match=rf"different budgets \({next(iter(change))}.*--tag"):
            protocol.check_one_budget([_row("genie", 0), _row("sadag", 1, **change)])
    # a real run generates nothing, so its generation steps (the preset's) are not part of the budget
    protocol.check_one_budget([_row("genie", 0), _row("real", 1, gen={"genie_iters": 4000})])
    with pytest.raises(SystemExit, match="num_images"):  # a variant changes the calibration, not the images
        protocol.check_one_budget([_row("genie", 0), _row("genie-wide", 0, num_images=1024)])


def test_a_method_holds_one_engine_draw_and_generation_settings_across_bits_and_seeds() -> None:
    """Rows of one method pair as its repeats: one of another engine, QDrop draw or Genie-D/SADAG setting must not
    be one of them, at the same bits or another."""
    plain = {"engine": "eager", "drop_draw": "uniform", "gen": {"genie_iters": 300, "refine_iters": 200,
                                                                "lowpass": 0.0, "bn_scope": "batch"}}

    def rows(method: str, **change) -> list[dict]:  # noqa: ANN003
        return [_row("genie", 0, **plain), _row(method, 0, **plain), _row(method, 1, bits="4/4", **plain),
                _row(method, 2, **{**plain, **change})]

    protocol.check_one_budget(rows("sadag"))
    # a setting a row does not hold (its run predates it) is at its default, as sadag resumes such a run
    protocol.check_one_budget(rows("sadag", gen={**plain["gen"], "bn_scope": None, "precision": "fp32"}))
    for change, named in (({"engine": "fused"}, "engine"), ({"drop_draw": "bytes"}, "drop_draw"),
                          ({"gen": {**plain["gen"], "refine_iters": 60}}, "gen of sadag"),
                          ({"gen": {**plain["gen"], "bn_scope": "set"}}, "gen of sadag")):
        with pytest.raises(SystemExit, match=rf"different budgets \({named}: .*sadag 2/2 s2.*--tag"):
            protocol.check_one_budget(rows("sadag", **change))
    # genie-lowpass's D0 is its own, not genie's; but D0 20 and D0 80 are two methods
    def d0(value: float) -> dict:
        return {**plain, "gen": {**plain["gen"], "lowpass": value}}

    lowpass = [_row("genie", 0, **plain), _row("genie-lowpass", 0, **d0(20.0)),
               _row("genie-lowpass", 1, bits="4/4", **d0(20.0))]
    protocol.check_one_budget(lowpass)
    with pytest.raises(SystemExit, match="gen of genie-lowpass"):
        protocol.check_one_budget([*lowpass, _row("genie-lowpass", 2, **d0(80.0))])
    # a real run's generation settings are never read (since 2026-12-02 it records the preset's)
    protocol.check_one_budget(rows("real", gen={"genie_iters": 4000, "refine_iters": 60}))


def test_a_calibration_variant_changes_its_own_setting_only() -> None:
    plain = {"engine": "eager", "drop_draw": "uniform"}
    base = [_row("genie", 0, **plain), _row("sadag", 0, **plain)]
    variants = [_row("genie-bytes", 0, engine="eager", drop_draw="bytes"),
                _row("genie-fused", 0, engine="fused", drop_draw="uniform"),
                _row("genie-wide", 0, calib_iters=1000, calib_batch_size=64, **plain)]
    protocol.check_one_budget(base + variants)
    for bad, named in ((_row("genie-wide", 1, calib_iters=1000, calib_batch_size=32, **plain), "calib_batch_size"),
                       (_row("genie-wide", 1, calib_iters=2000, calib_batch_size=64, **plain), "calib_iters"),
                       (_row("genie-bytes", 1, calib_iters=500, engine="eager", drop_draw="bytes"), "calib_iters"),
                       (_row("genie-bytes", 1, engine="fused", drop_draw="bytes"), "engine"),
                       (_row("genie-fused", 1, engine="eager", drop_draw="uniform"), "engine of genie-fused"),
                       (_row("sadag", 1, engine="fused", drop_draw="uniform"), "engine")):
        with pytest.raises(SystemExit, match=rf"different budgets \({named}: "):
            protocol.check_one_budget(base + variants + [bad])


@pytest.mark.parametrize("name", ["protocol_resnet20_cifar10", "protocol_resnet20_cifar10_n1024",
                                  "protocol_resnet56_cifar10", "protocol_resnet56_cifar10_rerun1202"])
def test_the_recorded_results_files_hold_one_budget(name: str) -> None:
    """Their rows were collected before the engine, draw and generation settings were compared within a method;
    they pass (some genie and sadag rows lack bn_scope, precision or refine_parallel: made before those existed)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{name}.json"
    protocol.check_one_budget(json.loads(path.read_text())["rows"])


def test_arguments_that_would_lose_or_fake_runs_are_refused() -> None:
    import argparse

    assert protocol.quantized_bits("2/4") == "2/4"
    for bad in ("4/fp", "4", "1/4", "16/16"):  # 4/fp: its run directory would never be collected
        with pytest.raises(argparse.ArgumentTypeError, match="weight/activation bits"):
            protocol.quantized_bits(bad)
    assert protocol.positive_float("20") == 20.0
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number"):
            protocol.positive_float(bad)


def test_the_benchmarks_give_no_setting_their_calibration_runs_do_not_read(tmp_path: Path) -> None:
    """sadag refuses a setting a run would not read: the protocol's real runs and zero_shot's calibrations on
    saved sets must pass that check (they once gave generation settings and a method)."""
    import argparse

    import zero_shot
    from sadag.config import apply_preset, check_unused_settings

    args = argparse.Namespace(work=str(tmp_path), model="resnet20_cifar10", genie_from=None, num_images=256,
                              gen_batch=128, genie_iters=300, refine_iters=200, warmup_iters=500, calib_iters=2000,
                              engine="eager", drop_draw="uniform", lowpass=None, real_data=str(tmp_path / "train"),
                              device="cpu", eval_limit=None)
    real = protocol.run_config(args, "2/2", "real", 0, 32)
    zs = zero_shot.calibration_config("resnet20_cifar10", tmp_path / "set", tmp_path / "run", "4/4", 0, {"iters": 5})
    for cfg in (real, zs):
        check_unused_settings(apply_preset(cfg))
    assert (real.method, real.num_calib, apply_preset(real).calib.iters) == ("real", 256, 2000)
