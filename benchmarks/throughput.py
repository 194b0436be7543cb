"""Throughput of the reference engines against the fast ones, in one run, same seeds.

Reference: Genie-D and SADAG's refinement one batch at a time with the generator in the plain NCHW layout
(gen.parallel_batches=1), reconstruction eager (calib.engine=eager) with QDrop's masks from float uniforms
(calib.drop_draw=uniform).
Fast: what the library does by default: gen.parallel_batches=0 (CPU: one batch at a time, the generator's
activations channels_last; GPU: all the run's batches in one pass), reconstruction with calib.engine=auto (CPU:
fused, the units' BatchNorms folded into their convs and channels_last activations; GPU: compiled) and byte
masks (calib.drop_draw=bytes). Changes to code both engines share (the LSQ quantizer's passes) speed up both
columns: compare versions for those.
Each cost is the difference of two runs (k1 and k2 iterations) over k2 - k1: setup and compilation cancel.
The FLOP floor is a step's FLOPs (torch's flop counter) over the device's measured convolution rate.
SADAG's refinement is also timed with all the batches in one pass (gen.refine_parallel, another diversity term)
against one by one: refine_pass_speedup.
With --lower-precision (CUDA): also the fast engines with Genie-D under bf16 autocast (gen.precision=bf16) and
reconstruction with TF32 (calib.tf32), as the keys genie_d_bf16_speedup and recon_tf32_speedup (over fast).
Usage: python benchmarks/throughput.py [--quick] [--repeats 3] [--device cpu|cuda] [--threads 2] [--lower-precision]
Writes benchmarks/results/throughput_{cpu,cuda}.json (top level: genie_d_speedup, recon_speedup,
max_abs_image_diff); do not publish timings taken on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sadag
from _common import RESULTS, WEIGHTS, machine
from sadag.config import CalibConfig, GenConfig
from sadag.generation import generate_genie, generator, refine_sadag
from sadag.quantization.prepare import float_copy
from sadag.reconstruction.cache import capture_unit_io
from sadag.reconstruction.reconstruct import calibrate_unit_, reconstruct_


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:  # noqa: ANN001
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def per_step(fn, k1: int, k2: int, device: torch.device) -> float:  # noqa: ANN001
    fn(k1)  # untimed: first-call costs (allocator, thread pool, compilation) must not land in one of the two
    return (timed(lambda: fn(k2), device) - timed(lambda: fn(k1), device)) / (k2 - k1)


def interleaved(fns: dict, k1: int, k2: int, device: torch.device, repeats: int) -> dict[str, float]:  # noqa: ANN001
    """per_step of each engine, the engines alternated `repeats` times: the median of each, so that a slow
    spell of a shared machine does not land on one engine only."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(per_step(fn, k1, k2, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def conv_rate(device: torch.device) -> float:
    """FLOP/s of a 3x3 convolution forward, batch 128, 64 -> 64 channels, 32x32 (ResNet-20's shapes x4)."""
    x = torch.randn(128, 64, 32, 32, device=device)
    w = torch.randn(64, 64, 3, 3, device=device)
    F.conv2d(x, w, padding=1)
    reps = 20 if device.type == "cuda" else 3
    sec = timed(lambda: [F.conv2d(x, w, padding=1) for _ in range(reps)], device) / reps
    return 2 * 128 * 64 * 64 * 9 * 32 * 32 / sec


def flops(fn) -> int:  # noqa: ANN001
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def max_diff(a: list, b: list) -> float:
    return max((x.images - y.images).abs().max().item() for x, y in zip(a, b, strict=True))


@contextlib.contextmanager
def layout(plain: bool):  # noqa: ANN201
    """The generator's activations in the plain NCHW layout (the reference) or the library's (channels_last on
    CPU)."""
    saved = generator.CHANNELS_LAST_ON_CPU
    generator.CHANNELS_LAST_ON_CPU = not plain
    try:
        yield
    finally:
        generator.CHANNELS_LAST_ON_CPU = saved


# engine -> (gen.parallel_batches, plain layout): the reference is the per-batch loop in NCHW; the fast engine
# is the library's default (auto: one batch at a time in channels_last on CPU, all batches in one pass on GPU)
GENIE_ENGINES = {"reference": (1, True), "fast": (0, False)}


def genie_rows(model, spec, args, device) -> dict:  # noqa: ANN001
    images = args.batches * args.batch
    base = GenConfig(num_images=images, batch_size=args.batch)
    out: dict = {}

    def make(k: int, parallel: int, plain: bool, precision: str = "fp32") -> list:
        with layout(plain):
            return generate_genie(model, spec, replace(base, genie_iters=k, parallel_batches=parallel,
                                                       precision=precision), 0)

    engines = {**GENIE_ENGINES, **({"fast_bf16": GENIE_ENGINES["fast"]} if args.lower_precision else {})}
    fns = {name: (lambda k, p=parallel, lay=plain, pr="bf16" if name == "fast_bf16" else "fp32": make(k, p, lay, pr))
           for name, (parallel, plain) in engines.items()}
    for name, sec in interleaved(fns, args.k1, args.k2, device, args.repeats).items():
        out[name] = {"seconds_per_step_of_all_batches": sec, "image_steps_per_s": images / sec}
    first = [make(1, *GENIE_ENGINES[e]) for e in ("reference", "fast")]
    last = [make(args.k2, *GENIE_ENGINES[e]) for e in ("reference", "fast")]
    out["max_abs_image_diff_first_step"] = max_diff(*first)
    out["max_abs_image_diff"] = max_diff(*last)
    step_flops = flops(lambda: generate_genie(model, spec, replace(base, num_images=args.batch, genie_iters=1), 0))
    out["flops_per_batch_step"] = step_flops
    return out


def refine_rows(model, qmodel, batches: list, spec, args, device) -> dict:  # noqa: ANN001
    """SADAG refinement steps per second (one batch, random neighbor) in both layouts."""
    cfg = GenConfig(num_images=args.batch, batch_size=args.batch, neighbor="random")

    def run(k: int, plain: bool) -> None:
        with layout(plain):
            refine_sadag(model, qmodel, batches, spec, replace(cfg, refine_iters=k), 0)

    fns = {name: (lambda k, lay=plain: run(k, lay)) for name, (_, plain) in GENIE_ENGINES.items()}
    out = {name: {"steps_per_s": 1 / sec} for name, sec in interleaved(fns, args.k1, args.k2, device,
                                                                          args.repeats).items()}
    return {**out, "batch": args.batch}


def refine_pass_rows(model, qmodel, batches: list, spec, args, device) -> dict:  # noqa: ANN001
    """SADAG refinement (released neighbor) of all the batches one by one, the paper's diversity term, against
    one pass (gen.refine_parallel, which changes that term): image-steps per second."""
    count, images = len(batches), len(batches) * args.batch
    cfg = GenConfig(num_images=images, batch_size=args.batch)
    fns = {name: (lambda k, p=parallel: refine_sadag(model, qmodel, batches, spec,
                                                     replace(cfg, refine_iters=k, refine_parallel=p), 0))
           for name, parallel in (("one_by_one", 1), ("one_pass", count))}
    # --quick: one round of one step (the full run alternates them args.repeats times): it stays under 5 minutes
    k1, k2, repeats = (1, 2, 1) if args.quick else (args.k1, args.k2, args.repeats)
    sec = interleaved(fns, k1, k2, device, repeats)
    return {**{name: {"image_steps_per_s": images / s} for name, s in sec.items()}, "batches": count,
            "batch": args.batch, "k": [k1, k2], "repeats": repeats}


# engine -> (calib.engine, calib.drop_draw, calib.tf32): the reference is the eager step with QDrop's masks from
# float uniforms; the fast engine is the library's default (auto: compiled on CUDA, fused on a CPU; byte masks)
RECON_ENGINES = {"reference": ("eager", "uniform", False), "fast": ("auto", "bytes", False)}


def unit_row(block, data: tuple, args, device) -> dict:  # noqa: ANN001
    """Iterations per second of one unit for each engine (on copies of the block, the engines alternated) and
    its FLOPs per iteration."""
    engines = {**RECON_ENGINES, **({"fast_tf32": ("auto", "bytes", True)} if args.lower_precision else {})}
    seen: dict[str, list[dict]] = {name: [] for name in engines}

    def runner(name: str):  # noqa: ANN202
        engine, draw, tf32 = engines[name]
        cfg = CalibConfig(engine=engine, drop_draw=draw, warmup=0.0, tf32=tf32)
        return lambda k: calibrate_unit_(copy.deepcopy(block), *data, replace(cfg, iters=k), 0,
                                         progress=lambda _s, _i, _n, metrics: seen[name].append(metrics))

    sec = interleaved({name: runner(name) for name in engines}, args.r1, args.r2, device, args.unit_repeats)
    row: dict = {name: {"iters_per_s": 1 / sec[name],
                        "compile_s": max((m.get("compile_s", 0.0) for m in seen[name]), default=0.0)}
                 for name in engines}
    eager = CalibConfig(warmup=0.0, engine="eager")
    counts = [flops(lambda k=k: calibrate_unit_(copy.deepcopy(block), *data, replace(eager, iters=k), 0))
              for k in (1, 3)]
    row["flops_per_iter"] = (counts[1] - counts[0]) // 2  # without the quantizers' initialising forward
    return row


def recon_rows(qmodel, images, args, device) -> dict:  # noqa: ANN001
    fp = float_copy(qmodel)
    modules = dict(qmodel.named_modules())
    rows = []
    for unit in qmodel.sadag_plan.units[: args.units]:
        fp_in, fp_out = capture_unit_io(fp, unit, images, 32)
        q_in, _ = capture_unit_io(qmodel, unit, images, 32, want_output=False)
        rows.append({"unit": unit, **unit_row(modules[unit], (fp_in, q_in, fp_out), args, device)})
    return {"units": rows}


def positive_int(text: str) -> int:
    """An argparse type for counts: --units 0 (or --unit-repeats 0) times nothing and failed only after all the
    Genie-D timings, dividing by 0 (or taking the median of no sample)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20_cifar10")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="2 batches and few iterations: under 5 minutes on 2 cores")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="Genie-D and refinement engines alternated this many times, the median of each kept")
    p.add_argument("--unit-repeats", type=positive_int, default=3,
                   help="reconstruction engines alternated this many times per unit, the median kept")
    p.add_argument("--units", type=positive_int,
                   help="time only the first N reconstruction units (default: all); the speedup is then over those "
                        "units")
    p.add_argument("--lower-precision", action="store_true",
                   help="CUDA: also Genie-D under bf16 autocast and reconstruction with TF32")
    args = p.parse_args(argv)
    if args.lower_precision and args.device != "cuda":
        p.error("--lower-precision measures TF32, a CUDA setting: use it with --device cuda")
    return args


def main() -> None:
    args = parse_args()
    q = args.quick
    args.batches, args.batch = (2, 128) if q else (8, 128)
    args.k1, args.k2 = (1, 3) if q else (5, 25)
    args.r1, args.r2 = (5, 25) if q else (50, 550)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    weights = WEIGHTS.get(args.model)
    model, spec = sadag.load_model(args.model, weights=str(weights) if weights else None)
    model = model.to(device)
    rate = conv_rate(device)
    genie = genie_rows(model, spec, args, device)
    # batch b is seeded from (seed, b) alone: batch 0 is the same whatever the count
    batches = generate_genie(model, spec, GenConfig(num_images=args.batches * args.batch, batch_size=args.batch,
                                                    genie_iters=2), 0)
    calib = batches[0].images.to(device)
    example = calib[:1]
    qmodel = reconstruct_(sadag.quantize(model, sadag.QuantConfig(4, 4), example), calib, CalibConfig(iters=0))
    refine = refine_rows(model, qmodel, batches[:1], spec, args, device)
    passes = refine_pass_rows(model, qmodel, batches, spec, args, device)
    recon = recon_rows(sadag.quantize(model, sadag.QuantConfig(4, 4), example), calib, args, device)
    ref_it = sum(1 / u["reference"]["iters_per_s"] for u in recon["units"])
    fast_it = sum(1 / u["fast"]["iters_per_s"] for u in recon["units"])
    recon_flops = sum(u["flops_per_iter"] for u in recon["units"])
    lower = {}
    if args.lower_precision:
        tf32_it = sum(1 / u["fast_tf32"]["iters_per_s"] for u in recon["units"])
        lower = {"genie_d_bf16_speedup": genie["fast"]["seconds_per_step_of_all_batches"]
                 / genie["fast_bf16"]["seconds_per_step_of_all_batches"], "recon_tf32_speedup": fast_it / tf32_it}
    result = {
        **lower,
        "genie_d_speedup": genie["reference"]["seconds_per_step_of_all_batches"]
        / genie["fast"]["seconds_per_step_of_all_batches"],
        "recon_speedup": ref_it / fast_it,
        "max_abs_image_diff": genie["max_abs_image_diff"],
        "max_abs_image_diff_first_step": genie["max_abs_image_diff_first_step"],
        "genie_d": genie,
        "refine_speedup": refine["fast"]["steps_per_s"] / refine["reference"]["steps_per_s"],
        "sadag_refine": refine,
        "refine_pass_speedup": passes["one_pass"]["image_steps_per_s"] / passes["one_by_one"]["image_steps_per_s"],
        "sadag_refine_passes": passes,
        "reconstruction": recon,
        "flop_floor": {
            "conv_flops_per_s": rate,
            "genie_d_step_of_all_batches_s": genie["flops_per_batch_step"] * args.batches / rate,
            "recon_iteration_all_units_s": recon_flops / rate,
        },
        "meta": {"model": args.model, "quick": q, "batches": args.batches, "batch": args.batch, "k": [args.k1, args.k2],
                 "repeats": args.repeats, "unit_repeats": args.unit_repeats, "recon_iters": [args.r1, args.r2],
                 "recon_units_timed": len(recon["units"]), "machine": machine(),
                 "note": "float32 engines differ by rounding, which Adam's first steps amplify: the first-step "
                         "diff checks the math, the k2 diff is what a user sees (thread count changes alone give "
                         "the same order)"},
    }
    path = RESULTS / f"throughput_{device.type}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Genie-D {result['genie_d_speedup']:.2f}x ({genie['fast']['image_steps_per_s']:.0f} image-steps/s; floor "
          f"{result['flop_floor']['genie_d_step_of_all_batches_s']:.3f} s/step), reconstruction "
          f"{result['recon_speedup']:.2f}x ({1 / fast_it:.1f} iterations/s over all units; floor "
          f"{recon_flops / rate * 1e3:.2f} ms), SADAG refinement {result['refine_speedup']:.2f}x (all batches in "
          f"one pass {result['refine_pass_speedup']:.2f}x), max image diff "
          f"{result['max_abs_image_diff']:.3g} (first step {result['max_abs_image_diff_first_step']:.3g})")
    print(f"wrote {path}; machine: {machine()}")


if __name__ == "__main__":
    main()
