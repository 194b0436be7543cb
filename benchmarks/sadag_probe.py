"""Does SADAG's refinement do what its theory says? Diagnostics on the saved sets of zero_shot.py.

SADAG argues that a quantized model calibrated on data X is flat on real data when the gradient of
the reconstruction loss on X aligns with the gradient on real data (docs/method.md section 4). With the
stage-B warm-up quantized model of each seed (W4A4, frozen), this script measures, for every saved set
of that seed and for real images as a reference, with no calibration:

- align: cosine between the set's mean last-layer gradient (1/N) sum_i e_i (x) h_i and the same mean over
  real CIFAR-10 test images (e = f_FP - f_Q logits, h = the Q model's last linear input);
- div: L_D of the set (mean over samples of the largest |cosine| to another sample's gradient);
- bn: L_BN of the set in batches of 128 (Genie's normalization, no input prior);
- change: relative L2 distance of the images to the Genie-D images of the same seed.

Usage: python benchmarks/sadag_probe.py [--seeds 0 1 2] [--budget cpu] [--real 2000]
Prints a markdown table and writes benchmarks/results/sadag_probe_<model>_<budget>.json.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import sadag
from _common import CIFAR_TRAIN, EVAL, WORK, base_config, machine, write_results
from sadag.data import load_calibration_data
from sadag.export import load_quantized
from sadag.generation import load_synthetic_set
from sadag.generation.bn_stats import bn_layers, bn_statistics_loss, capture_bn_inputs
from sadag.generation.sadag import capture_linear_input, gradient_cosine, last_linear
from zero_shot import METHODS, ONE_SEED, set_path


@torch.no_grad()
def last_layer_terms(fp: nn.Module, q: nn.Module, images: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """e = f_FP(x) - f_Q(x) and h = the Q model's last linear input, for every image."""
    es, hs = [], []
    with capture_linear_input(last_linear(q, images.shape[-1])) as slot:
        for part in images.split(chunk):
            e = fp(part) - q(part)
            es.append(e)
            hs.append(slot[0].flatten(1))
    return torch.cat(es), torch.cat(hs)


def mean_gradient(e: Tensor, h: Tensor) -> Tensor:
    return e.T @ h / e.shape[0]


def diversity(e: Tensor, h: Tensor) -> float:
    sim = gradient_cosine(e, h, e, h).abs().fill_diagonal_(0.0)
    return sim.max(dim=1).values.mean().item()


@torch.no_grad()
def bn_loss(fp: nn.Module, images: Tensor, batch: int = 128) -> float:
    layers, losses = bn_layers(fp), []
    with capture_bn_inputs(fp) as inputs:
        for part in images.split(batch):
            fp(part)
            losses.append(bn_statistics_loss(inputs, layers).item())
    return sum(losses) / len(losses)


def warmup_model(run_dir: Path, fp: nn.Module) -> nn.Module:
    """The frozen stage-B quantized model a SADAG run published (RUN_DIR/warmup.safetensors)."""
    q, _meta = load_quantized(run_dir / "warmup.safetensors", model=copy.deepcopy(fp))
    return q.eval()


def probe_set(fp: nn.Module, q: nn.Module, images: Tensor, g_real: Tensor, genie: Tensor | None = None
              ) -> dict[str, Any]:
    """align, div, bn and (given the Genie-D images the set was refined from) change, for one set."""
    e, h = last_layer_terms(fp, q, images)
    g = mean_gradient(e, h)
    change = None if genie is None or genie.shape != images.shape else ((images - genie).norm() / genie.norm()).item()
    return {"num": images.shape[0],
            "align": torch.nn.functional.cosine_similarity(g.flatten(), g_real.flatten(), dim=0).item(),
            "div": diversity(e, h), "bn": bn_loss(fp, images), "change": change}


def probe_seed(model_name: str, seed: int, budget: str, work: Path, real: Tensor, train: Tensor,
               fp: nn.Module, spec: Any) -> list[dict[str, Any]]:
    run_dir = set_path(model_name, "sadag-random", seed, budget, work)
    if not (run_dir / "warmup.safetensors").exists():
        print(f"seed {seed}: no stage-B model in {run_dir}; skipped")
        return []
    q = warmup_model(run_dir, fp)
    g_real = mean_gradient(*last_layer_terms(fp, q, real))
    sets: dict[str, Tensor] = {"real train (reference)": train}
    for method in (m for m in METHODS if m != "real"):  # the reference above is the real set
        directory = set_path(model_name, method, 0 if method in ONE_SEED else seed, budget, work)
        if (directory / "images.pt").exists():
            sets[method] = load_synthetic_set(directory)[0]
    genie = sets.get("genie")
    rows = []
    for name, images in sets.items():
        rows.append({"seed": seed, "set": name,
                     **probe_set(fp, q, images, g_real, genie if name.startswith("sadag") else None)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--budget", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--real", type=int, default=2000, help="real test images for the reference gradient")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(WORK))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fp, spec = sadag.load_model(args.model, weights=base_config(args.model, Path(".")).weights)
    fp.eval()
    real = load_calibration_data(EVAL[args.model][0], spec, args.real, seed=0)
    train = load_calibration_data(CIFAR_TRAIN, spec, 256, seed=0)
    rows = [r for s in args.seeds for r in probe_seed(args.model, s, args.budget, Path(args.work), real, train,
                                                      fp, spec)]
    print("| seed | set | align with real | L_D | L_BN | change vs genie |\n|---|---|---|---|---|---|")
    for r in rows:
        change = "-" if r["change"] is None else f"{r['change']:.3f}"
        print(f"| {r['seed']} | {r['set']} | {r['align']:.3f} | {r['div']:.3f} | {r['bn']:.3f} | {change} |")
    path = write_results(f"sadag_probe_{args.model}_{args.budget}", rows,
                         {"budget": args.budget, "real_test_images": args.real})
    print(f"machine: {machine()}; results in {path}")


if __name__ == "__main__":
    main()
