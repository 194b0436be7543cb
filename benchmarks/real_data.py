"""Real-data calibration (the engine alone): ResNet-20 on 1,024 or 256 real CIFAR-10 training images.

Usage: python benchmarks/real_data.py [--budget fast|fast-legacy|peer] [--bits 4/4 3/3 2/4] [--model resnet20_cifar10]
Prints a markdown table and writes benchmarks/results/real_<model>_<budget>.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import CIFAR_TRAIN, WORK, base_config, machine, run_row, sections, write_results

# "fast": the fast preset on 1,024 images; "peer": Genie's reference budget (256 images, 2,000 iters/unit);
# "fast-legacy": "fast" with the calibration details of sadag <= 0.1 (minibatches drawn with replacement, the
# weight step size's lr not annealed), to measure the switch to Genie's reference behaviour paired by seed
BUDGETS = {
    "fast": {"num_calib": 1024, "calib": {}},
    "fast-legacy": {"num_calib": 1024, "calib": {"sampling": "replacement", "anneal_w_scale": False}},
    "peer": {"num_calib": 256, "calib": {"iters": 2000}},
}


def training_images(model: str) -> Path:
    """The real training images of `model`: the benchmarks have them for the CIFAR-10 models only, and another
    model calibrated on CIFAR-10 images would measure the wrong data, not real-data calibration."""
    if not model.endswith("cifar10"):
        raise SystemExit(f"real-data calibration of {model} needs its real training images, and the benchmarks have "
                         f"them only for the CIFAR-10 models ({CIFAR_TRAIN}): for {model}, run `sadag run --method "
                         "real --calib-data FOLDER`")
    return CIFAR_TRAIN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--budget", default="fast", choices=list(BUDGETS))
    p.add_argument("--bits", nargs="+", default=["4/4", "3/3", "2/4"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(WORK), help="run directories (resumable)")
    args = p.parse_args()
    calib_data = training_images(args.model)  # refused before any run
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    rows = []
    for bits in args.bits:
        out = Path(args.work) / f"real_{args.model}_{args.budget}_w{bits.replace('/', 'a')}_s{args.seed}"
        cfg = base_config(args.model, out, method="real", bits=bits, preset="fast", seed=args.seed,
                          calib_data=str(calib_data), num_calib=budget["num_calib"],
                          **sections({"calib": budget["calib"]}))
        rows.append(run_row(cfg))
        r = rows[-1]
        print(f"| {args.model} | W{r['w_bits']}A{r['a_bits']} | {r['num_calib']} | {r['fp_top1']:.2f} | "
              f"{r['quant_top1']:.2f} | {r['quant_top5']:.2f} | {r['seconds'].get('calibrate', 0):.0f} |", flush=True)
    path = write_results(f"real_{args.model}_{args.budget}", rows, {"budget": args.budget},
                         key=("model", "w_bits", "a_bits", "seed", "num_calib"))
    print(f"machine: {machine()}; results in {path}")


if __name__ == "__main__":
    main()
