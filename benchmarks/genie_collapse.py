"""Why does Genie-D collapse on EfficientNet-Lite0? One Genie-D batch, traced, then calibrated.

Runs Genie-D on one batch with a config variant, and every --every steps records: the BN loss, how many
images have a near-copy (sadag.generation.near_copy_mask), the median latent norm of those images and of
the others, the fraction of the generator's pre-tanh values beyond |3| (saturated: the image becomes a
sign pattern), the share of the batch's pixel variance in its top 5 principal components (1.0 = every
image on one 5-d pattern), and the spread of the latent norms. The finished batch is then saved as a
calibration set and calibrated (W4A4 by default; `--bits` with no value skips it), so the variants'
collapse can be set beside their accuracy.

Usage: python benchmarks/genie_collapse.py --variant base|lr_z_0.01|lr_g_0.001|no_swing [--iters 500]
       python benchmarks/genie_collapse.py --collect      (the table of the variants already run)
Results: benchmarks/results/genie_collapse_<model>_<variant>[_<tag>].json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sadag
from _common import RESULTS, WEIGHTS, WORK, base_config, run_row, write_results
from sadag.generation import generate_genie, near_copy_mask
from sadag.generation.io import save_synthetic_set
from sadag.pipeline import resolve_device

VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},  # docs/method.md section 2
    "lr_z_0.01": {"lr_z": 0.01},  # latents moved 10x slower: do moving latents drive the collapse?
    "lr_g_0.001": {"lr_g": 0.001},  # generator moved 10x slower
    "no_swing": {"swing": False},
}
SATURATED = 3.0  # |pre-tanh| beyond this: tanh within 0.5% of +-1


def pre_tanh(gen: nn.Module, z: Tensor) -> Tensor:
    """The generator's input to its Tanh, recomputed without gradients (only the generator's BN running
    statistics move, and the generator never uses them: it always runs in train mode)."""
    tanh = next(m for m in gen.modules() if isinstance(m, nn.Tanh))
    seen: list[Tensor] = []
    handle = tanh.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            gen(z)
    finally:
        handle.remove()
    return seen[0]


def top_share(images: Tensor, k: int = 5, size: int = 32) -> float:
    """Share of the batch's pixel variance in its top k principal components (images pooled to size)."""
    x = F.adaptive_avg_pool2d(images.float(), size).flatten(1)
    x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x) ** 2
    return float(s[:k].sum() / s.sum())


def median_or_nan(values: Tensor) -> float:
    return round(float(values.median()), 2) if values.numel() else float("nan")


def trace_point(it: int, gen: nn.Module, z: Tensor, images: Tensor) -> dict[str, float]:
    norms = z.norm(dim=1)
    copies = near_copy_mask(images)
    return {
        "iteration": it + 1,
        "near_duplicates": int(copies.sum()),
        # are the copies the images whose latents shrank toward 0?
        "copies_z_norm_median": median_or_nan(norms[copies]),
        "others_z_norm_median": median_or_nan(norms[~copies]),
        "saturated": float((pre_tanh(gen, z).abs() > SATURATED).float().mean()),
        "top5_share": round(top_share(images), 4),
        "z_norm_min": round(float(norms.min()), 2),
        "z_norm_median": round(float(norms.median()), 2),
        "z_norm_max": round(float(norms.max()), 2),
    }


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    weights = WEIGHTS[args.model]
    model, spec = sadag.load_model(args.model, weights=str(weights) if weights else None)
    device = resolve_device(args.device)
    model = model.to(device)
    cfg = replace(sadag.GenConfig(num_images=args.batch, batch_size=args.batch, genie_iters=args.iters),
                  **VARIANTS[args.variant])
    trace: list[dict[str, float]] = []
    losses: dict[int, float] = {}

    def progress(_stage: str, step: int, _total: int, metrics: dict[str, float]) -> None:
        losses[step] = metrics["loss"]

    def on_log(_batch: int, it: int, gen: nn.Module, z: Tensor, images: Tensor) -> None:
        trace.append({**trace_point(it, gen, z, images), "loss": round(losses.get(it + 1, float("nan")), 4)})
        print(json.dumps(trace[-1]), flush=True)

    start = time.perf_counter()
    batch = generate_genie(model, spec, cfg, args.seed, progress=progress, log_every=args.every, on_log=on_log)[0]
    seconds = round(time.perf_counter() - start, 1)
    set_dir = Path(args.work) / "sets" / f"{args.model}_{args.variant}_s{args.seed}"
    save_synthetic_set(set_dir, batch.images, spec, {"method": "genie", "variant": args.variant, "seed": args.seed,
                                                     "seconds": {"generate": seconds}})
    accuracy = {}
    for bits in args.bits:
        out = Path(args.work) / "runs" / f"{set_dir.name}_w{bits.replace('/', 'a')}"
        rcfg = base_config(args.model, out, bits=bits, preset="fast", seed=args.seed,  # the set records its method
                           calib_data=str(set_dir), device=args.device,
                           calib=sadag.CalibConfig(iters=args.calib_iters, batch_size=min(32, args.batch)))
        accuracy[bits] = run_row(rcfg)["quant_top1"]
    return {"variant": args.variant, "overrides": VARIANTS[args.variant], "seed": args.seed, "iters": args.iters,
            "batch": args.batch, "calib_iters": args.calib_iters, "generate_seconds": seconds, "top1": accuracy,
            "trace": trace}


def collect(model: str) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"genie_collapse_{model}_*.json"))]
    print("| variant | Genie-D steps | near-copies | saturated | top-5 share | z norms | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for result in rows:
        row = result["rows"][0]
        last = row["trace"][-1]
        top1 = ", ".join(f"W{b.replace('/', 'A')} {v:.2f}" for b, v in row["top1"].items())
        name = row["variant"] + (f" ({result['meta']['tag']})" if result["meta"].get("tag") else "")
        print(f"| {name} | {last['iteration']} | {last['near_duplicates']}/{row['batch']} | "
              f"{last['saturated']:.2f} | {last['top5_share']:.2f} | {last['z_norm_min']}-{last['z_norm_max']} | "
              f"{top1} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--variant", default="base", choices=list(VARIANTS))
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", nargs="*", default=["4/4"])
    p.add_argument("--calib-iters", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(WORK / "collapse"))
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. the machine)")
    p.add_argument("--collect", action="store_true")
    args = p.parse_args()
    if args.collect:
        collect(args.model)
        return
    torch.set_num_threads(args.threads)
    row = run_variant(args)
    path = write_results(f"genie_collapse_{args.model}_{args.variant}{'_' + args.tag if args.tag else ''}", [row],
                         {"model": args.model, "tag": args.tag})
    print(f"results in {path}")


if __name__ == "__main__":
    main()
