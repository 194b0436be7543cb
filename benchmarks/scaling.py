"""Scale-out on torch.distributed: measured CPU speedups and a projection of the paper budget on N GPUs.

measure: one `sadag run` (Genie-D, reconstruction, FP and quantized evaluation) four ways on this machine:
1 process with 1 thread, 1 process with 2 threads, `torchrun --nproc-per-node 2` with 1 thread per rank, and
the same 2 ranks with the wide split (minibatch 64 = a whole 32 per rank, half the iterations); each stage's
seconds come from the run's report. Speedup of 2 ranks against the other two; efficiency =
(1-thread time) / (2 x 2-rank time).

project: a PROJECTION, not a measurement. From per-step costs measured on one GPU (flags; e.g. from
benchmarks/step_cost.py and throughput.py), the time of the `paper` preset on 1, 2, 4 and 8 GPUs for
EfficientNet-Lite0 and a ResNet-18-sized model, with the split sadag uses: Genie-D batches over ranks
(ceil(batches / N) rounds), SADAG's refinement sequential, reconstruction data-parallel (a step's
slice-dependent part divided by N, plus its fixed part and one gradient all-reduce), evaluation sharded.
--split wide projects the other data-parallel split: every rank takes a whole minibatch and the run makes
1/N of the iterations (`--calib-batch-size N x 32 --calib-iters 20000/N`: the same images per unit; its
accuracy against the exact split is measured by `protocol.py --methods genie genie-wide` at N = 2).

Usage: python benchmarks/scaling.py measure [--smoke]
       python benchmarks/scaling.py project --model efficientnet_lite0 --genie-step S --calib-step S ...
       (once per model, each with the costs measured on it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import EVAL, WEIGHTS, WORK, write_results
from sadag.config import CalibConfig, GenConfig

STAGES = ("generate", "calibrate", "fp_eval", "quant_eval")
# reconstruction units as sadag.quantize cuts them: counted on EfficientNet-Lite0; ResNet-18 in BRECQ's blocks
# (stem, 8 basic blocks, classifier)
UNITS = {"efficientnet_lite0": 19, "resnet18_sized": 10}
EVAL_IMAGES = 50_000  # ImageNet validation


def _run(out: Path, ranks: int, threads: int, smoke: bool, wide: bool = False) -> dict[str, Any]:
    model = "resnet20_cifar10"
    eval_data, _ = EVAL[model]
    # 2 Genie-D batches of 128 (one per rank), 200 reconstruction iterations per unit, 2,000 test images: minutes
    budget = (["--preset", "smoke", "--eval-limit", "64"] if smoke else
              ["--preset", "fast", "--num-images", "256", "--gen-iters", "100", "--eval-limit", "200"])
    calib_iters, calib_batch = (20, 16) if smoke else (200, 32)  # the presets' minibatch
    if wide:  # a whole minibatch per rank, the same images per unit
        calib_iters, calib_batch = calib_iters // ranks, calib_batch * ranks
    budget += ["--calib-iters", str(calib_iters), "--calib-batch-size", str(calib_batch)]
    args = ["-m", "sadag", "run", "--model", model, "--weights", str(WEIGHTS[model]), "--method", "genie",
            "--bits", "4/4", "--eval-data", str(eval_data), "--out", str(out), "--force", "--no-export",
            "--threads", str(threads), "--seed", "0", *budget]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launch, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) x {threads} thread(s) failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"ranks": ranks, "threads": threads, "split": "wide" if wide else "exact",
            "wall_s": round(time.perf_counter() - start, 1),
            **{s: report["seconds"].get(s) for s in STAGES}, "quant_top1": report.get("quant_top1")}


def measure(smoke: bool) -> None:
    ways = ((1, 1, False), (1, 2, False), (2, 1, False), (2, 1, True))
    rows = [_run(WORK / f"scaling_{r}x{t}{'_wide' if w else ''}", r, t, smoke, w) for r, t, w in ways]
    one, threads2 = rows[:2]
    for ranks2 in rows[2:]:
        print(f"2 ranks x 1 thread, {ranks2['split']} split:")
        for stage in (*STAGES, "wall_s"):
            if not ranks2[stage]:
                continue
            a, b, c = one[stage], threads2[stage], ranks2[stage]
            print(f"{stage:>10}: 1x1 {a:8.1f}s  1x2 {b:8.1f}s  2x1 {c:8.1f}s  speedup vs 1 thread {a / c:.2f}, "
                  f"vs 2 threads {b / c:.2f}, efficiency {a / (2 * c):.0%}")
    if not smoke:
        what = "1 process x 1/2 threads against 2 torchrun ranks x 1, exact and wide split"
        print(write_results("scaling_cpu", rows, {"what": what}))


@dataclass(frozen=True)
class StepCosts:
    """Seconds measured on one GPU (inputs of the projection)."""

    genie_step: float  # one Genie-D iteration of one batch of gen.batch_size
    refine_step: float  # one SADAG refinement iteration of one batch
    calib_step: float  # one reconstruction iteration of one unit (mean over units), whole minibatch
    calib_fixed: float  # the part of calib_step that does not shrink with a smaller slice (launches)
    allreduce: float  # one gradient all-reduce of a unit's parameters between GPUs
    eval_image: float  # evaluating one image


def project(costs: StepCosts, units: int, gpus: int, method: str = "sadag", split: str = "exact") -> dict[str, float]:
    """Projected seconds of each stage of the `paper` preset on ``gpus`` GPUs (a model, not a measurement).

    split "exact": each step's minibatch is sliced over the GPUs; "wide": each GPU takes a whole minibatch and
    the reconstruction makes 1/gpus of the iterations."""
    gen, calib = GenConfig(), CalibConfig()
    batches = math.ceil(gen.num_images / gen.batch_size)
    if split == "wide":
        calib_step = costs.calib_step / gpus
    else:
        calib_step = costs.calib_fixed + (costs.calib_step - costs.calib_fixed) / gpus
    calib_step += costs.allreduce if gpus > 1 else 0.0
    out = {"generate": math.ceil(batches / gpus) * gen.genie_iters * costs.genie_step,
           "calibrate": units * calib.iters * calib_step,
           "evaluate": 2 * EVAL_IMAGES * costs.eval_image / gpus}  # FP and quantized
    if method == "sadag":
        out["warmup_calibrate"] = units * gen.warmup_calib_iters * calib_step
        out["refine"] = batches * gen.refine_iters * costs.refine_step  # sequential: batch k needs batches < k
    out["total"] = sum(out.values())
    return out


def _project_cli(args: argparse.Namespace) -> None:
    costs = StepCosts(args.genie_step, args.refine_step, args.calib_step, args.calib_fixed, args.allreduce,
                      args.eval_image)
    units = UNITS[args.model]
    print(f"PROJECTION for {args.model} ({units} units) from the per-step costs given, not a measurement; hours of "
          f"the paper preset, method {args.method}, {args.split} data-parallel split:")
    base = project(costs, units, 1, args.method)["total"]
    rows = []
    for gpus in (1, 2, 4, 8):
        p = project(costs, units, gpus, args.method, args.split)
        rows.append({"gpus": gpus, "seconds": p, "speedup": base / p["total"]})
        stages = ", ".join(f"{k} {v / 3600:.2f}" for k, v in p.items() if k != "total")
        print(f"{gpus} GPU(s): {p['total'] / 3600:6.2f} h (speedup {base / p['total']:.2f}; {stages})")
    meta = {"kind": "PROJECTION, not a measurement", "model": args.model, "units": units, "method": args.method,
            "split": args.split, "step_costs_s": vars(costs), "source": args.source}
    name = f"scaling_projection_{args.model}_{args.method}" + ("_wide" if args.split == "wide" else "")
    print(f"written to {write_results(name, rows, meta)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="1 against 2 ranks on this CPU")
    m.add_argument("--smoke", action="store_true", help="seconds-long budgets: checks the script, times nothing")
    j = sub.add_parser("project", help="projected time of the paper preset on 1-8 GPUs from per-step costs")
    j.add_argument("--model", required=True, choices=list(UNITS), help="the model the step costs were measured on")
    j.add_argument("--method", default="sadag", choices=["sadag", "genie"])
    j.add_argument("--split", default="exact", choices=["exact", "wide"],
                   help="exact: minibatch sliced over GPUs; wide: a whole minibatch per GPU, 1/N of the iterations")
    for flag, help_ in (("--genie-step", "s per Genie-D iteration of one batch"),
                        ("--refine-step", "s per SADAG refinement iteration of one batch"),
                        ("--calib-step", "s per reconstruction iteration of one unit, whole minibatch"),
                        ("--calib-fixed", "s of that step that do not shrink with the slice (launch-bound part)"),
                        ("--allreduce", "s per gradient all-reduce between GPUs"),
                        ("--eval-image", "s per evaluated image")):
        j.add_argument(flag, type=float, required=flag in ("--genie-step", "--calib-step"), default=0.0, help=help_)
    j.add_argument("--source", default="", help="where the step costs come from (stored with the projection)")
    args = p.parse_args()
    if args.command == "measure":
        measure(args.smoke)
    else:
        _project_cli(args)


if __name__ == "__main__":
    main()
