"""The budget frontier: top-1 against time for the costly knobs of a run (issue 12, item 5).

Each point is a budget (Genie-D steps per batch, SADAG warm-up iterations per unit and refinement steps per
batch, reconstruction iterations per unit, images) run end to end with `sadag run`; the seconds are the run's
stage times, so they are comparable only between runs made alone on the same idle machine (--threads 2 here).
Usage: python benchmarks/frontier.py [--points genie300 genie100 ...] [--bits 4/4 2/4] [--seeds 0] [--method sadag]
Prints a markdown table and adds its rows to benchmarks/results/frontier_<model>.json (one row per run).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import sadag
from _common import WORK, base_config, calibration_of, machine, run_row, sections, write_results

# Points are budgets over BASE, the `fast` preset of 2026-11-30 to 2026-12-02, written out here so that a point's
# name keeps its meaning when the preset moves (the rows name points; their budgets are recorded too). The preset
# was genie1000 before 2026-11-30, genie300 until 2026-12-02, and is FAST_POINT since.
BASE: dict[str, dict[str, Any]] = {
    "calib": {"iters": 2000},
    "gen": {"num_images": 256, "genie_iters": 300, "warmup_calib_iters": 150, "refine_iters": 60, "zeroq_iters": 500},
}
POINTS: dict[str, dict[str, dict[str, Any]]] = {
    "genie1000": {"gen": {"genie_iters": 1000, "warmup_calib_iters": 500, "refine_iters": 200}},
    "genie300": {},
    "genie300-calib1000": {"calib": {"iters": 1000}},
    "genie100": {"gen": {"genie_iters": 100}},
    "genie300-128img": {"gen": {"num_images": 128}},
}
FAST_POINT = "genie100"
POINTS_NOTE = ("budgets over frontier.BASE (the fast preset of 2026-11-30 to 2026-12-02); before 2026-12-02 the rows "
               "of genie300 were named 'fast', genie100 'fast-genie100', genie300-calib1000 'fast-calib1000'")
STAGES = ("generate", "warmup_calibrate", "refine", "calibrate")


def point_budget(point: str) -> dict[str, dict[str, Any]]:
    """The point's gen and calib settings: BASE with the point's own knobs moved."""
    return {name: {**BASE[name], **POINTS[point].get(name, {})} for name in BASE}


def point_config(model: str, point: str, bits: str, seed: int, method: str, work: Path) -> sadag.RunConfig:
    budget = point_budget(point)
    out = work / "frontier" / model / f"{method}_{point}_w{bits.replace('/', 'a')}_s{seed}"
    return base_config(model, out, method=method, bits=bits, preset="fast", seed=seed, **sections(budget, method))


def point_row(cfg: sadag.RunConfig, point: str, bits: str, report: dict[str, Any]) -> dict[str, Any]:
    """A run's row: its budget, and where and how it calibrated. Rows of several sessions share one file (whose
    meta.machine is the last session's), so each names its machine (this process's: a finished run reused from
    --work was made on it, as work folders stay on their machine, but maybe at other --threads) and the engine,
    QDrop draw and minibatch that its run directory records (the engine as "auto" resolved)."""
    sec = report["seconds"]
    return {"model": cfg.model, "method": cfg.method, "point": point, "bits": bits, "seed": cfg.seed,
            "top1": report["quant_top1"], "num_images": cfg.gen.num_images,
            "genie_iters": cfg.gen.genie_iters, "warmup_calib_iters": cfg.gen.warmup_calib_iters,
            "refine_iters": cfg.gen.refine_iters, **calibration_of(Path(cfg.out)), "machine": machine(),
            "seconds": sec, "total_s": round(sum(sec.values()), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--points", nargs="+", default=[FAST_POINT, "genie1000"], choices=list(POINTS))
    p.add_argument("--bits", nargs="+", default=["4/4"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--method", default="sadag", choices=["sadag", "genie"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(WORK), help="run directories (resumable; a finished run is reused)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| point | bits | seed | top-1 | " + " | ".join(f"{s} s" for s in STAGES) + " | total s |")
    print("|---|---|---|---|" + "---|" * (len(STAGES) + 1))
    for point in args.points:
        for bits in args.bits:
            for seed in args.seeds:
                cfg = point_config(args.model, point, bits, seed, args.method, Path(args.work))
                row = point_row(cfg, point, bits, run_row(cfg))
                sec = row["seconds"]
                rows.append(row)
                cells = " | ".join(f"{sec.get(s, 0):.0f}" for s in STAGES)
                print(f"| {point} | W{bits.replace('/', 'A')} | {seed} | {row['top1']:.2f} | {cells} | "
                      f"{row['total_s']:.0f} |", flush=True)
    path = write_results(f"frontier_{args.model}", rows,
                         {"machine": machine(), "note": "seconds comparable only between runs made alone",
                          "points": POINTS_NOTE},
                         key=("method", "point", "bits", "seed"))
    print(f"machine: {machine()}; results in {path}")


if __name__ == "__main__":
    main()
