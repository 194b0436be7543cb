"""Scale-out on torch.distributed: measured CPU speedups and a projection of the paper budget on N GPUs.

measure: one `sadag run` (Genie-D, reconstruction, FP and quantized evaluation) several ways on this machine:
on the CPU, 1 process with 1 thread, 1 process with 2 threads, `torchrun --nproc-per-node 2` with 1 thread per
rank, and the same 2 ranks with the wide split (minibatch 64 = a whole 32 per rank, half the iterations);
with --device cuda --ranks N, 1 process against N ranks sharing one GPU (SADAG_SHARE_GPU=1, gloo), exact and
wide split. Each stage's seconds come from the run's report; speedups against the 1-process runs.

project: a PROJECTION, not a measurement. From per-step costs measured on one GPU (flags; e.g. from
benchmarks/step_cost.py and throughput.py), the time of the `paper` preset on 1, 2, 4 and 8 GPUs for
EfficientNet-Lite0 and a ResNet-18-sized model, with the split sadag uses: Genie-D batches over ranks
(ceil(batches / N) rounds), SADAG's refinement sequential, reconstruction data-parallel (a step's
slice-dependent part divided by N, plus its fixed part and one gradient all-reduce), evaluation sharded.
--split wide projects the other data-parallel split: every rank takes a whole minibatch and the run makes
1/N of the iterations (`--calib-batch-size N x 32 --calib-iters 20000/N`: the same images per unit; its
accuracy against the exact split is measured by `protocol.py --methods genie genie-wide` at N = 2).

Usage: python benchmarks/scaling.py measure [--smoke] [--device cuda --ranks 4]
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

from _common import EVAL, WEIGHTS, WORK, wide_split, write_results
from sadag.config import CalibConfig, GenConfig

STAGES = ("generate", "calibrate", "fp_eval", "quant_eval")
# reconstruction units as sadag.quantize cuts them: counted on EfficientNet-Lite0; ResNet-18 in BRECQ's blocks
# (stem, 8 basic blocks, classifier)
UNITS = {"efficientnet_lite0": 19, "resnet18_sized": 10}
EVAL_IMAGES = 50_000  # ImageNet validation
CALIB, CALIB_SMOKE = (200, 32), (20, 16)  # (reconstruction iterations per unit, minibatch) of the measured runs


@dataclass(frozen=True)
class Way:
    """One way to run the measured job: processes, threads each, and the data-parallel split."""

    ranks: int
    threads: int
    wide: bool = False

    @property
    def name(self) -> str:
        return f"{self.ranks}x{self.threads}" + ("_wide" if self.wide else "")


def _run(out: Path, way: Way, smoke: bool, device: str, batches: int) -> dict[str, Any]:
    model = "resnet20_cifar10"
    eval_data, _ = EVAL[model]
    # `batches` Genie-D batches of 128 (one per rank), 200 reconstruction iterations per unit, 2,000 test images
    budget = (["--preset", "smoke", "--eval-limit", "64"] if smoke else
              ["--preset", "fast", "--num-images", str(128 * batches), "--gen-iters", "100", "--eval-limit", "200"])
    calib_iters, calib_batch = CALIB_SMOKE if smoke else CALIB  # the presets' minibatch
    if way.wide:
        calib_iters, calib_batch = wide_split(calib_iters, calib_batch, way.ranks)
    budget += ["--calib-iters", str(calib_iters), "--calib-batch-size", str(calib_batch)]
    args = ["-m", "sadag", "run", "--model", model, "--weights", str(WEIGHTS[model]), "--method", "genie",
            "--bits", "4/4", "--eval-data", str(eval_data), "--out", str(out), "--force", "--no-export",
            "--threads", str(way.threads), "--seed", "0", "--device", device, *budget]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(way.ranks)]
    launch = launch if way.ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(way.threads)}
    if device == "cuda":  # every rank on the first visible GPU, gloo between them
        env.update(SADAG_SHARE_GPU="1", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launch, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{way.ranks} rank(s) x {way.threads} thread(s) failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"ranks": way.ranks, "threads": way.threads, "split": "wide" if way.wide else "exact", "device": device,
            "wall_s": round(time.perf_counter() - start, 1),
            **{s: report["seconds"].get(s) for s in STAGES}, "quant_top1": report.get("quant_top1")}


def measure(smoke: bool, device: str, ranks: int) -> None:
    """CPU: 1 process x 1 and x ``ranks`` threads against ``ranks`` ranks x 1 thread (exact and wide split).
    CUDA: 1 process against ``ranks`` ranks sharing one GPU (exact and wide split), 2 threads each."""
    threads = 1 if device == "cpu" else 2
    base = [Way(1, 1), Way(1, ranks)] if device == "cpu" else [Way(1, threads)]
    ways = [*base, Way(ranks, threads), Way(ranks, threads, wide=True)]
    rows = [_run(WORK / f"scaling_{device}_{w.name}", w, smoke, device, ranks) for w in ways]
    for way, row in zip(ways[len(base):], rows[len(base):], strict=True):
        print(f"{way.ranks} ranks x {way.threads} thread(s) on {device}, {row['split']} split:")
        for stage in (*STAGES, "wall_s"):
            if not row[stage]:
                continue
            against = ", ".join(f"{b.name} {r[stage]:8.1f}s (speedup {r[stage] / row[stage]:.2f})"
                                for b, r in zip(base, rows[:len(base)], strict=True))
            print(f"{stage:>10}: {row[stage]:8.1f}s; {against}")
    if not smoke:
        what = (f"1 process against {ranks} torchrun ranks x {threads} thread(s), exact and wide split"
                + (" (ranks sharing one GPU, gloo)" if device == "cuda" else ""))
        print(write_results(f"scaling_{device}", rows, {"what": what}))


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
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the ranks share one GPU")
    m.add_argument("--ranks", type=int, default=2, help="processes of the multi-rank runs (and threads of the "
                   "CPU baseline)")
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
        if args.ranks < 2:
            p.error(f"--ranks {args.ranks}: give at least 2 (the measurement compares 1 process against N ranks)")
        if (CALIB_SMOKE if args.smoke else CALIB)[0] % args.ranks:  # before the first run, not at the wide split
            p.error(f"--ranks {args.ranks}: the wide split divides the {CALIB[0]} calibration iterations (smoke: "
                    f"{CALIB_SMOKE[0]}) by the ranks; give a number of ranks that divides them")
        measure(args.smoke, args.device, args.ranks)
    else:
        _project_cli(args)


if __name__ == "__main__":
    main()
