"""Zero-shot comparison on real test data: noise / zeroq / genie / sadag-random / sadag-adversarial
(plus `real`, real training images through the same calibration, and the sadag-* ablations).

Each (method, seed) synthesizes ONE calibration set, reused at every bit width (the SADAG warm-up
quantized model of stage B is W4A4). SADAG continues from the Genie set of the same seed (public API:
gen.genie_set), so the two share their Genie-D work exactly, as in the paper's pipeline; the SADAG
variants other than sadag-random also reuse its stage-B model (gen.warmup_model).

Usage: python benchmarks/zero_shot.py [--budget cpu|cpu-lite|peer|short|tiny|fast] [--seeds 0 1 2] [--methods ...]
       [--calib-iters N] [--generate-only | --collect]
Prints a markdown table (and SADAG minus Genie, paired by seed) and writes
benchmarks/results/zero_shot_<model>_<budget>[_ablation][_itN].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

import sadag
from _common import (
    WEIGHTS,
    WORK,
    base_config,
    log_progress,
    machine,
    mean_spread,
    run_row,
    sections,
    write_results,
)
from real_data import training_images
from sadag.config import apply_preset, to_dict
from sadag.data import load_calibration_data
from sadag.generation import load_synthetic_set, save_synthetic_set

BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    # fits the shared 2-core CPU machine: 2 batches x 300 Genie-D steps, 300 reconstruction iterations per unit
    "cpu": {"gen": {"num_images": 256, "genie_iters": 300, "warmup_calib_iters": 150, "refine_iters": 60},
            "calib": {"iters": 300}},
    # for the deeper/bigger models on CPU (ResNet-56): one batch of 128, shorter generation
    "cpu-lite": {"gen": {"num_images": 128, "genie_iters": 200, "warmup_calib_iters": 100, "refine_iters": 40},
                 "calib": {"iters": 300}},
    # Genie's reference budget of the issue: 256 images (2 x 1,000 Genie-D steps), 2,000 iterations per unit
    "peer": {"gen": {"num_images": 256, "genie_iters": 1000, "warmup_calib_iters": 500, "refine_iters": 200},
             "calib": {"iters": 2000}},
    # the larger models on a GPU inside a short device lease (EfficientNet-Lite0): half the peer's budget
    "short": {"gen": {"num_images": 256, "genie_iters": 500, "warmup_calib_iters": 250, "refine_iters": 100},
              "calib": {"iters": 1000}},
    # what fits the last minutes of a lease: EfficientNet-Lite0 with one batch of 128
    "tiny": {"gen": {"num_images": 128, "genie_iters": 400, "warmup_calib_iters": 200, "refine_iters": 80},
             "calib": {"iters": 500}},
    "fast": {"gen": {}, "calib": {}},
    "smoke": {"gen": {"num_images": 32, "batch_size": 16, "genie_iters": 5, "warmup_calib_iters": 3, "refine_iters": 3,
                      "zeroq_iters": 5}, "calib": {"iters": 3}},
}
# name -> (method, gen overrides); the sadag-* variants after the first two are the ablations of the
# "why does SADAG not help" study (run on request with --methods)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "real": ("real", {}),  # reference: real training images, as many as the budget's synthetic ones
    "noise": ("noise", {}), "zeroq": ("zeroq", {}), "genie": ("genie", {}),
    "sadag-random": ("sadag", {"neighbor": "random"}),
    "sadag-adversarial": ("sadag", {"neighbor": "adversarial"}),
    "sadag-bn-only": ("sadag", {"lambda_gm": 0.0, "lambda_div": 0.0}),  # control: refinement without L_GM, L_D
    "sadag-x10": ("sadag", {"lambda_gm": 10.0, "lambda_div": 10.0}),  # sharpness terms 10x stronger
    "sadag-free": ("sadag", {"refine_g_decay": 1.0, "refine_lr_z": 1e-3}),  # no 0.95/step decay, z lr 100x
}
PRESET = "fast"  # what a budget leaves out is this preset's, in the sets and in the runs
# gen settings naming the sets a set continues from: paths, not how it is made (those sets are checked themselves)
SET_PATHS = ("genie_set", "warmup_model")
MAIN_METHODS = ["noise", "zeroq", "genie", "sadag-random", "sadag-adversarial"]
ONE_SEED = ["real", "noise", "zeroq"]  # their sets are made with the first seed only


def set_path(model: str, method: str, seed: int, budget: str, work: Path) -> Path:
    return work / "sets" / f"{model}_{method}_{budget}_s{seed}"


def synthetic_set(model: str, method: str, seed: int, budget: str, work: Path) -> Path:
    kind, variant = METHODS[method]
    out = set_path(model, method, seed, budget, work)
    if (out / "images.pt").exists():
        check_set(out, budget_gen(budget, method))
        return out
    gen = {**BUDGETS[budget]["gen"], **variant}
    if kind == "real":
        return real_set(model, budget_gen(budget, method)["num_images"], seed, out)
    if kind == "sadag":  # continue from the Genie set of the same seed (identical config for that stage)
        gen["genie_set"] = str(synthetic_set(model, "genie", seed, budget, work))
        if method != "sadag-random":  # and from its stage-B model, which no neighbor/loss option changes
            gen["warmup_model"] = str(synthetic_set(model, "sadag-random", seed, budget, work) / "warmup.safetensors")
    cfg = base_config(model, out, method=kind, bits="4/4", preset=PRESET, seed=seed,
                      **sections({"gen": gen, "calib": BUDGETS[budget]["calib"]}, kind))
    return sadag.generate_set(cfg, resume=True, progress=log_progress())


def budget_gen(budget: str, method: str) -> dict[str, Any]:
    """The gen settings of a set of this budget and method, resolved as its run resolves them (a setting the
    budget leaves out is the preset's: `fast` gets the preset's 256 images, real as many as the synthetic sets)."""
    gen = {**BUDGETS[budget]["gen"], **METHODS[method][1]}
    resolved = to_dict(apply_preset(sadag.RunConfig(preset=PRESET, **sections({"gen": gen}, METHODS[method][0]))).gen)
    return {k: v for k, v in resolved.items() if k not in SET_PATHS}


def calibration_config(model: str, set_dir: Path, out: Path, bits: str, seed: int,
                       calib: dict[str, Any]) -> sadag.RunConfig:
    """The run that calibrates on a saved set: no --method (the set records the method that made it)."""
    return base_config(model, out, bits=bits, preset=PRESET, seed=seed, calib_data=str(set_dir),
                       **sections({"calib": calib}))


def check_set(out: Path, expected: dict[str, Any]) -> None:
    """Refuse a saved set made with other gen settings than `expected`: sets are named by budget only, so an
    edited budget would otherwise reuse its old sets. A setting the set did not record is not checked (a real
    set records none: its size is its image count)."""
    images, info = load_synthetic_set(out)
    made = {**(info["meta"].get("gen") or {}), "num_images": images.shape[0]}
    diff = [f"gen.{k} {made[k]!r} in the set, {v!r} in the budget" for k, v in expected.items()
            if k in made and made[k] != v]
    if diff:
        raise SystemExit(f"{out} was made with other settings than its budget's ({'; '.join(diff)}): delete that "
                         "folder to make it again with the budget's, or use another --work")


def real_set(model: str, num: int, seed: int, out: Path) -> Path:
    """`num` real CIFAR training images sampled with `seed`, saved like a synthetic set."""
    data = training_images(model)
    spec = sadag.load_model(model, weights=str(WEIGHTS[model]))[1]
    images = load_calibration_data(data, spec, num, seed)
    save_synthetic_set(out, images, spec, {"method": "real", "model": model, "seed": seed, "seconds": {}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--budget", default="cpu", choices=list(BUDGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=MAIN_METHODS, choices=list(METHODS))
    p.add_argument("--bits", nargs="+", default=["4/4", "3/3", "2/4"])
    p.add_argument("--one-seed", nargs="*", default=ONE_SEED, help="methods run with the first seed only")
    p.add_argument("--calib-iters", type=int, help="calibrate the budget's sets with this many iterations per unit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(WORK))
    p.add_argument("--collect", action="store_true", help="only tabulate the runs already finished in --work")
    p.add_argument("--generate-only", action="store_true",
                   help="only make the sets (then calibrate each bit width in its own process)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    calib = {**BUDGETS[args.budget]["calib"], **({"iters": args.calib_iters} if args.calib_iters else {})}
    longer = f"_it{args.calib_iters}" if args.calib_iters else ""
    rows = []
    for method in args.methods:
        for seed in args.seeds[:1] if method in args.one_seed else args.seeds:
            if args.collect and not (set_path(args.model, method, seed, args.budget, work) / "images.pt").exists():
                continue
            set_dir = synthetic_set(args.model, method, seed, args.budget, work)
            if args.generate_only:
                continue
            meta = load_synthetic_set(set_dir)[1]["meta"]
            for bits in args.bits:
                out = work / "runs" / f"{args.model}_{method}_{args.budget}_w{bits.replace('/', 'a')}_s{seed}{longer}"
                if args.collect and not (out / "report.json").exists():
                    continue
                report = run_row(calibration_config(args.model, set_dir, out, bits, seed, calib))
                row = {**report, "method": method, "gen_seconds": meta.get("seconds", {})}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("method", "seed", "w_bits", "a_bits", "quant_top1")}), flush=True)
    if args.generate_only:
        return
    print(table(rows))
    print(paired_table(rows))
    ablation = "_ablation" if set(args.methods) - {*MAIN_METHODS, "real"} else ""
    path = write_results(f"zero_shot_{args.model}_{args.budget}{ablation}{longer}", rows,
                         {"budget": BUDGETS[args.budget], "calib": calib},
                         key=("method", "seed", "w_bits", "a_bits"))
    print(f"machine: {machine()}; results in {path}")


def table(rows: list[dict[str, Any]]) -> str:
    """Top-1 (mean ± spread over seeds) per bit width, and the mean wall seconds of every stage."""
    bits = sorted({(r["w_bits"], r["a_bits"]) for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    stages = ["generate", "warmup_calibrate", "refine"]
    head = ("| method | " + " | ".join(f"W{w}A{a}" for w, a in bits)
            + " | Genie-D / ZeroQ s | stage B s | stage C s | calibration s |")
    lines = [head, "|" + "---|" * (len(bits) + 5)]
    for m in methods:
        cells = [mean_spread([r["quant_top1"] for r in rows if r["method"] == m and (r["w_bits"], r["a_bits"]) == b])
                 for b in bits]
        mine = [r for r in rows if r["method"] == m]
        gen = [statistics.mean(stage_seconds(r, s, rows) for r in mine) for s in stages]
        cal = statistics.mean(r["seconds"].get("calibrate", 0) for r in mine)
        lines.append(f"| {m} | " + " | ".join(cells) + "".join(f" | {g:.0f}" for g in gen) + f" | {cal:.0f} |")
    fp = rows[0]["fp_top1"] if rows else float("nan")
    return "\n".join(lines) + f"\n\nFP top-1 {fp:.2f}"


def paired_table(rows: list[dict[str, Any]], base: str = "genie") -> str:
    """Each method minus `base` on the same seed and bits (the two share their Genie-D batches)."""
    top1 = {(r["method"], r["seed"], r["w_bits"], r["a_bits"]): r["quant_top1"] for r in rows}
    bits = sorted({(r["w_bits"], r["a_bits"]) for r in rows}, reverse=True)
    lines = [f"| minus {base}, same seed | " + " | ".join(f"W{w}A{a}" for w, a in bits) + " |",
             "|" + "---|" * (len(bits) + 1)]
    for m in dict.fromkeys(r["method"] for r in rows if r["method"].startswith("sadag")):
        cells = []
        for w, a in bits:
            diffs = [v - top1[(base, s, w, a)] for (mm, s, ww, aa), v in top1.items()
                     if (mm, ww, aa) == (m, w, a) and (base, s, w, a) in top1]
            cells.append(mean_spread(diffs))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_seconds(row: dict[str, Any], stage: str, rows: list[dict[str, Any]]) -> float:
    """Seconds of one generation stage. A SADAG set that continued from a Genie set (or a stage-B model) records
    no time (older sets: a second or two) for that stage: count it where it was done, the genie set (or the
    sadag-random set) of the same seed."""
    own = row["gen_seconds"].get(stage, 0.0)
    donor = {"generate": "genie", "warmup_calibrate": "sadag-random"}.get(stage)
    if own < 5.0 and donor and row["method"].startswith("sadag"):
        same_seed = [r for r in rows if r["method"] == donor and r["seed"] == row["seed"]]
        return same_seed[0]["gen_seconds"].get(stage, 0.0) if same_seed else own
    return own


if __name__ == "__main__":
    main()
