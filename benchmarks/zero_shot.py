"""Zero-shot comparison on real test data: noise / zeroq / genie / sadag-random / sadag-adversarial.

Each (method, seed) synthesizes ONE calibration set, reused at every bit width (the SADAG warm-up
quantized model of stage B is W4A4). SADAG continues from the Genie-D batches of the same seed, so
the two share their warm-up work exactly, as in the paper's pipeline.

Usage: python benchmarks/zero_shot.py [--budget cpu|peer|fast] [--seeds 0 1 2] [--methods ...]
Prints a markdown table and writes benchmarks/results/zero_shot_<model>_<budget>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

import sadag
from _common import base_config, machine, mean_spread, run_row, write_results

BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    # fits the shared 2-core CPU machine: 2 batches x 300 Genie-D steps, 300 reconstruction iterations per unit
    "cpu": {"gen": {"num_images": 256, "genie_iters": 300, "warmup_calib_iters": 150, "refine_iters": 60},
            "calib": {"iters": 300}},
    # Genie's reference budget of the issue: 256 images (2 x 1,000 Genie-D steps), 2,000 iterations per unit
    "peer": {"gen": {"num_images": 256, "genie_iters": 1000, "warmup_calib_iters": 500, "refine_iters": 200},
             "calib": {"iters": 2000}},
    "fast": {"gen": {}, "calib": {}},
    "smoke": {"gen": {"num_images": 32, "batch_size": 16, "genie_iters": 5, "warmup_calib_iters": 3, "refine_iters": 3,
                      "zeroq_iters": 5}, "calib": {"iters": 3}},
}
METHODS = {"noise": ("noise", None), "zeroq": ("zeroq", None), "genie": ("genie", None),
           "sadag-random": ("sadag", "random"), "sadag-adversarial": ("sadag", "adversarial")}


def set_path(model: str, method: str, seed: int, budget: str, work: Path) -> Path:
    return work / "sets" / f"{model}_{method}_{budget}_s{seed}"


def synthetic_set(model: str, method: str, seed: int, budget: str, work: Path) -> Path:
    kind, neighbor = METHODS[method]
    out = set_path(model, method, seed, budget, work)
    if (out / "images.pt").exists():
        return out
    gen = {**BUDGETS[budget]["gen"], **({"neighbor": neighbor} if neighbor else {})}
    cfg = base_config(model, out, method=kind, bits="4/4", preset="fast", seed=seed,
                      overrides={"gen": gen, "calib": BUDGETS[budget]["calib"]})
    if kind == "sadag":  # reuse the Genie-D batches of the same seed (identical config for that stage)
        genie = synthetic_set(model, "genie", seed, budget, work)
        (out / "state").mkdir(parents=True, exist_ok=True)
        for f in (genie / "state").glob("genie_batch_*.pt"):
            shutil.copy(f, out / "state" / f.name)
    return sadag.generate_set(cfg, resume=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--budget", default="cpu", choices=list(BUDGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--bits", nargs="+", default=["4/4", "3/3", "2/4"])
    p.add_argument("--one-seed", nargs="*", default=["noise", "zeroq"], help="methods run with the first seed only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="benchmarks/out")
    p.add_argument("--collect", action="store_true", help="only tabulate the runs already finished in --work")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    rows = []
    for method in args.methods:
        for seed in args.seeds[:1] if method in args.one_seed else args.seeds:
            if args.collect and not (set_path(args.model, method, seed, args.budget, work) / "images.pt").exists():
                continue
            set_dir = synthetic_set(args.model, method, seed, args.budget, work)
            meta = torch.load(set_dir / "images.pt", weights_only=True)["meta"]
            for bits in args.bits:
                out = work / "runs" / f"{args.model}_{method}_{args.budget}_w{bits.replace('/', 'a')}_s{seed}"
                if args.collect and not (out / "report.json").exists():
                    continue
                cfg = base_config(args.model, out, method="genie", bits=bits, preset="fast", seed=seed,
                                  calib_data=str(set_dir), overrides={"calib": BUDGETS[args.budget]["calib"]})
                row = {**run_row(cfg), "method": method, "gen_seconds": meta.get("seconds", {})}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("method", "seed", "w_bits", "a_bits", "quant_top1")}), flush=True)
    print(table(rows))
    path = write_results(f"zero_shot_{args.model}_{args.budget}", rows,
                         {"budget": BUDGETS[args.budget], "seeds": args.seeds, "bits": args.bits})
    print(f"machine: {machine()}; results in {path}")


def table(rows: list[dict[str, Any]]) -> str:
    bits = sorted({(r["w_bits"], r["a_bits"]) for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"W{w}A{a}" for w, a in bits) + " | generation s | calibration s |"
    lines = [head, "|" + "---|" * (len(bits) + 3)]
    for m in methods:
        cells = [mean_spread([r["quant_top1"] for r in rows if r["method"] == m and (r["w_bits"], r["a_bits"]) == b])
                 for b in bits]
        mine = [r for r in rows if r["method"] == m]
        gen = statistics.mean(sum(r["gen_seconds"].values()) for r in mine)
        cal = statistics.mean(r["seconds"].get("calibrate", 0) for r in mine)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {gen:.0f} | {cal:.0f} |")
    fp = rows[0]["fp_top1"] if rows else float("nan")
    return "\n".join(lines) + f"\n\nFP top-1 {fp:.2f}"


if __name__ == "__main__":
    main()
