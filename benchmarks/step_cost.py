"""Cost of one SADAG refinement step against one Genie-D step, measured in the same process.

Each cost is the difference of two runs (k1 and k2 iterations) divided by k2 - k1, so fixed setup
(generator init, hooks, swing copy) cancels out. Batch 128, ResNet-20 at 32x32 unless told otherwise.
Usage: python benchmarks/step_cost.py [--threads 2] [--k1 5 --k2 25] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import sadag
from _common import WEIGHTS, machine, write_results
from sadag.config import GenConfig
from sadag.generation import generate_genie, refine_sadag
from sadag.pipeline import resolve_device
from sadag.reconstruction.reconstruct import reconstruct_


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def per_step(fn, k1: int, k2: int) -> float:  # noqa: ANN001
    return (timed(lambda: fn(k2)) - timed(lambda: fn(k1))) / (k2 - k1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k1", type=int, default=5)
    p.add_argument("--k2", type=int, default=25)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, spec = sadag.load_model(args.model, weights=str(WEIGHTS[args.model]) if WEIGHTS[args.model] else None)
    model = model.to(device)
    base = GenConfig(num_images=args.batch, batch_size=args.batch)
    batches = generate_genie(model, spec, replace(base, genie_iters=args.k1), seed=0)
    example = torch.zeros(1, 3, spec.input_size, spec.input_size, device=device)
    qmodel = reconstruct_(sadag.quantize(model, sadag.QuantConfig(4, 4), example), batches[0].images.to(device),
                          sadag.CalibConfig(iters=0, batch_size=min(32, args.batch)))
    def genie(k: int, swing: bool = True) -> None:
        generate_genie(model, spec, replace(base, genie_iters=k, swing=swing), 0)

    def refine(k: int, neighbor: str) -> None:
        refine_sadag(model, qmodel, batches, spec, replace(base, refine_iters=k, neighbor=neighbor), 0)

    rows = {"genie_d_no_swing": per_step(lambda k: genie(k, swing=False), args.k1, args.k2),
            "genie_d": per_step(genie, args.k1, args.k2)}
    for neighbor in ("random", "adversarial"):
        rows[f"sadag_{neighbor}"] = per_step(lambda k, n=neighbor: refine(k, n), args.k1, args.k2)
    print(f"| step (batch {args.batch}, {args.model}) | seconds | x Genie-D |\n|---|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {sec:.3f} | {sec / rows['genie_d']:.2f} |")
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_results(f"step_cost_{args.model}{suffix}", [{"step": k, "seconds": v, "ratio_to_genie_d": v / rows["genie_d"]}
                                              for k, v in rows.items()], {"batch": args.batch, "k": [args.k1, args.k2]})
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
