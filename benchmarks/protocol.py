"""The paired protocol of issue 14: does a data method beat Genie, by more than the protocol can resolve?

For one model, every (bits, method, seed) is one `sadag.run` (public API) in its own run directory under
--work/protocol/<model>/; finished runs are reused, unfinished ones resumed. SADAG runs warm up at the target
bits (what `sadag run` does). Methods (the same seed gives the same Genie-D batches, so differences are paired):

  real            real training images through the same calibration (the headroom: real minus genie)
  genie           Genie-D
  sadag           SADAG with the released neighbor and the paper's lambdas (1, 1)
  sadag-div-only  SADAG with lambda_gm = 0
  sadag-gm-only   SADAG with lambda_div = 0
  sadag-pass      SADAG with all batches refined in one pass (gen.refine_parallel; each batch's diversity term
                  then sees the other batches at their current step): paired with sadag as well as with genie
  genie-lowpass   Genie-D, then SynQ's Gaussian low-pass filter (gen.lowpass = D0)
  genie-setbn     Genie-D with BatchNorm statistics matched over the whole set (gen.bn_scope = set, DGH)
  genie-bf16      Genie-D with the FP model under bf16 autocast (gen.precision = bf16; a speed setting)
  genie-wide      the genie set calibrated with twice the minibatch and half the iterations (the same images
                  per unit): what N = 2 ranks compute when each takes a whole minibatch (issue 13's wide split)
  genie-bytes     the genie set calibrated with QDrop's masks from random bytes (calib.drop_draw = bytes, the
                  library's default; the protocol's rows use uniform): does the faster draw change accuracy?
  genie-fused     the genie set calibrated by the fused engine (calib.engine = fused, auto's choice on a CPU:
                  BatchNorms folded into the convs, channels_last; the protocol's rows use eager): the same
                  function with other rounding and the masks' draws assigned in NHWC order: does it change accuracy?

Every method but genie, genie-setbn and real starts from the genie run's set of the same (bits, seed).

Usage: python benchmarks/protocol.py --model resnet20_cifar10 --bits 4/4 2/4 --seeds 0 1 2 3 4 [--jobs 4]
       python benchmarks/protocol.py ... --bits 4/4 3/3 --genie-from 2/2   (genie reuses the W2A2 runs' sets)
       python benchmarks/protocol.py --model resnet20_cifar10 --collect [--probe]
Both print the headroom table and the paired differences with 95% t-intervals of the finished runs in --work; only
--collect writes benchmarks/results/protocol_<model>.json (rows: model, bits, method, seed, top1, num_images,
calib_iters, ...) from every finished run of the model in --work, whatever --bits/--methods/--seeds say, with the
budgets read from the runs' own config.yaml; the file's earlier rows of runs that --work does not hold (made on
another machine, or in a work folder since deleted) are kept. A run that started from a genie run's set is paired
with that genie row only if the digests say it started from the images the genie row calibrated on (meta.pairs; a
genie row made with --genie-from pairs with nothing: a mismatch there is only reported). Each cell of meta.paired
counts its unverified pairs (no digest known) and its cross-machine ones (rows record their machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

import sadag
from _common import (
    CIFAR_TRAIN,
    EVAL,
    RESULTS,
    WORK,
    base_config,
    calibration_of,
    machine,
    merge_rows,
    run_row,
    sections,
    wide_split,
    write_results,
)
from sadag.config import METHOD_GEN_READS, result_defaults

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "real": ("real", {}),
    "genie": ("genie", {}),
    "sadag": ("sadag", {"neighbor": "released"}),
    "sadag-div-only": ("sadag", {"neighbor": "released", "lambda_gm": 0.0}),
    "sadag-gm-only": ("sadag", {"neighbor": "released", "lambda_div": 0.0}),
    "sadag-pass": ("sadag", {"neighbor": "released"}),  # gen.refine_parallel = the number of batches
    "genie-lowpass": ("genie", {}),  # gen.lowpass is added from --lowpass
    "genie-setbn": ("genie", {"bn_scope": "set"}),
    "genie-bf16": ("genie", {"precision": "bf16"}),  # issue 12: is bf16 Genie-D as good a set?
    "genie-wide": ("genie", {}),  # a calibration variant, see CALIBRATION_VARIANTS
    "genie-bytes": ("genie", {}),  # a calibration variant
    "genie-fused": ("genie", {}),  # a calibration variant
}
FROM_GENIE_SET = ("sadag", "sadag-div-only", "sadag-gm-only", "sadag-pass", "genie-lowpass", "genie-wide",
                  "genie-bytes", "genie-fused")
# methods that calibrate the genie set differently (no set of their own): calib settings, and "wide_ranks", the
# ranks of a wide split (issue 13)
CALIBRATION_VARIANTS: dict[str, dict[str, Any]] = {"genie-wide": {"wide_ranks": 2},
                                                   "genie-bytes": {"drop_draw": "bytes"},
                                                   "genie-fused": {"engine": "fused"}}
BASE = "genie"
# methods that also pair with another one than genie: the variant of a method against the method itself
VERSUS = {"sadag-pass": "sadag"}
GEN_KEYS = ("genie_iters", "warmup_calib_iters", "refine_iters", "refine_parallel", "neighbor", "lambda_gm",
            "lambda_div", "lowpass", "bn_scope", "precision")
MACHINE_KEYS = ("host", "cpu_model", "threads", "torch")  # what a row records of the machine that made it
# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (tests/test_protocol_stats.py checks them
# against a numerical integral of the t density).
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
Z975 = 1.959964
# One-sided 80% points t_{0.80, df}, df = 1..30 (checked the same way): with T975 they give the usual
# approximation of the smallest true difference that the 95% interval excludes zero for in four runs of the
# protocol out of five (80% power; the exact power is lower at small n, see summarize).
T80 = (1.376382, 1.060660, 0.978472, 0.940965, 0.919544, 0.905703, 0.896030, 0.888890, 0.883404, 0.879058,
       0.875530, 0.872609, 0.870152, 0.868055, 0.866245, 0.864667, 0.863279, 0.862049, 0.860951, 0.859964,
       0.859074, 0.858266, 0.857530, 0.856855, 0.856236, 0.855665, 0.855137, 0.854647, 0.854192, 0.853767)
Z80 = 0.841621


# --- statistics -------------------------------------------------------------------------------------

def _t_quantile(table: tuple[float, ...], z: float, df: int) -> float:
    """A t quantile: the table up to 30, then the Cornish-Fisher expansion in 1/df (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(table):
        return table[df - 1]
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_quantile_975(df: int) -> float:
    return _t_quantile(T975, Z975, df)


def t_quantile_80(df: int) -> float:
    return _t_quantile(T80, Z80, df)


def summarize(values: list[float]) -> dict[str, Any]:
    """mean, sd, n, standard error, the 95% t-interval, and "detectable": (t_0.975 + t_0.80) SE, the true
    difference whose 95% interval would exclude zero with probability about 80% at this spread and n (the usual
    approximation; 79% at n = 5, 73% at n = 2). A difference half the width of the interval is only just
    significant: at that size the protocol finds it in about half of its repeats."""
    n = len(values)
    out: dict[str, Any] = {"n": n, "mean": statistics.mean(values) if values else None,
                           "sd": None, "se": None, "lo": None, "hi": None, "detectable": None}
    if n >= 2:
        sd = statistics.stdev(values)
        se = sd / math.sqrt(n)
        half = t_quantile_975(n - 1) * se
        out.update(sd=sd, se=se, lo=out["mean"] - half, hi=out["mean"] + half,
                   detectable=(t_quantile_975(n - 1) + t_quantile_80(n - 1)) * se)
    return out


def paired_rows(rows: list[dict[str, Any]], method: str, bits: str,
                base: str = BASE) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(method's row, base's row) of each seed both have at these bits, by seed."""
    def by_seed(m: str) -> dict[int, dict[str, Any]]:
        return {r["seed"]: r for r in rows if r["method"] == m and r["bits"] == bits}

    mine, theirs = by_seed(method), by_seed(base)
    return [(mine[s], theirs[s]) for s in sorted(mine.keys() & theirs.keys())]


def paired_differences(rows: list[dict[str, Any]], method: str, bits: str, base: str = BASE) -> list[float]:
    """top1(method) - top1(base) over the seeds both have at these bits."""
    return [a["top1"] - b["top1"] for a, b in paired_rows(rows, method, bits, base)]


def cross_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both rows say where they ran, and not the same: another host, CPU, thread count or torch rounds floats
    otherwise. Rows made before runs recorded their host (machine None or its host None) count as unknown."""
    ma, mb = a.get("machine") or {}, b.get("machine") or {}
    known = ma.get("host") is not None and mb.get("host") is not None
    return known and any(ma.get(k) != mb.get(k) for k in MACHINE_KEYS)


def paired_cell(rows: list[dict[str, Any]], method: str, bits: str, base: str,
                unverified: set[tuple]) -> dict[str, Any]:
    """The summary of a cell's differences, with how many of its pairs are unverified (no digest confirms they
    share a set) and cross-machine. Both stay in the differences (a shared set calibrated on another machine adds
    rounding noise, not bias), but a reader must see how many there are."""
    pairs = paired_rows(rows, method, bits, base)
    return {**summarize([a["top1"] - b["top1"] for a, b in pairs]),
            "unverified": sum(row_key(a) in unverified or row_key(b) in unverified for a, b in pairs),
            "cross_machine": sum(cross_machine(a, b) for a, b in pairs)}


def paired_cells(rows: list[dict[str, Any]], bits: list[str]) -> dict[str, dict[str, Any]]:
    """meta.paired: every method minus genie, and each VERSUS pair, per bits; a note for every cell with pairs
    made on two machines."""
    unverified = {k for k, ok in set_verdicts(rows)[0].items() if ok is None}
    cells = {f"{m} {b}": paired_cell(rows, m, b, BASE, unverified) for m in METHODS if m != BASE for b in bits}
    cells.update({f"{m} vs {base} {b}": paired_cell(rows, m, b, base, unverified)
                  for m, base in VERSUS.items() for b in bits})
    for name, cell in cells.items():
        if cell["cross_machine"]:
            print(f"note: {name}: {cell['cross_machine']} of its {cell['n']} pairs ran on two machines (host, CPU, "
                  "threads or torch): kept in the differences, with the rounding noise that adds", flush=True)
    return cells


def format_summary(s: dict[str, Any]) -> str:
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:+.2f} (n=1)"
    return (f"{s['mean']:+.2f} ± {s['sd']:.2f} (n={s['n']}), 95% [{s['lo']:+.2f}, {s['hi']:+.2f}], "
            f"detectable {s['detectable']:.2f}")


def tables(rows: list[dict[str, Any]]) -> str:
    """The headroom (real minus genie) and every other method minus genie, paired by seed, per bits."""
    bits_list = sorted({r["bits"] for r in rows}, reverse=True)
    methods = [m for m in METHODS if m != BASE and any(r["method"] == m for r in rows)]
    lines = ["| minus genie, same seed | " + " | ".join(f"W{b.replace('/', 'A')}" for b in bits_list) + " |",
             "|" + "---|" * (len(bits_list) + 1)]
    for m in methods:
        cells = [format_summary(summarize(paired_differences(rows, m, b))) for b in bits_list]
        label = f"{m} (headroom)" if m == "real" else m
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for m, base in VERSUS.items():
        if any(r["method"] == m for r in rows):
            cells = [format_summary(summarize(paired_differences(rows, m, b, base))) for b in bits_list]
            lines.append(f"| {m} minus {base} | " + " | ".join(cells) + " |")
    genie = [f"{statistics.mean(v):.2f}" if (v := [r["top1"] for r in rows if r["method"] == BASE
                                                    and r["bits"] == b]) else "-" for b in bits_list]
    lines.append("| genie top-1 (mean) | " + " | ".join(genie) + " |")
    return "\n".join(lines)


# --- runs ---------------------------------------------------------------------------------------------

def run_dir(work: Path, model: str, bits: str, method: str, seed: int) -> Path:
    return work / "protocol" / model / f"w{bits.replace('/', 'a')}_{method}_s{seed}"


def budget(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    gen = {"num_images": args.num_images, "batch_size": min(args.gen_batch, args.num_images),
           "genie_iters": args.genie_iters, "refine_iters": args.refine_iters,
           "warmup_calib_iters": args.warmup_iters}
    return {"gen": gen, "calib": {"iters": args.calib_iters, "batch_size": min(32, args.num_images),
                                  "engine": args.engine, "drop_draw": args.drop_draw}}


def lowpass_d0(args: argparse.Namespace, input_size: int) -> float:
    """--lowpass, or SynQ's code default 80 at ImageNet size and 20 (the smallest D0 SynQ searched, the only
    one of theirs that filters a 32x32 image noticeably: gain 0.73 at the axis Nyquist) below it."""
    if args.lowpass is not None:
        return args.lowpass
    return 80.0 if input_size >= 224 else 20.0


def genie_source(args: argparse.Namespace, bits: str, method: str) -> str | None:
    """The bits of the genie run (same seed) whose set this run starts from, or None if it makes its own.

    The methods of FROM_GENIE_SET start from the genie set of their own bits: paired exactly. With --genie-from
    B, genie at other bits reuses genie's set at B: Genie-D never sees the bits, so the set is the one it would
    make (bit for bit at the same thread count), and the calibrations at every bits share one Genie-D stage.
    """
    if method in FROM_GENIE_SET:
        return bits
    if method == BASE and args.genie_from not in (None, bits):
        return args.genie_from
    return None


def run_config(args: argparse.Namespace, bits: str, method: str, seed: int, input_size: int) -> sadag.RunConfig:
    kind, gen_extra = METHODS[method]
    b = budget(args)
    gen = {**b["gen"], **gen_extra}
    if method == "genie-lowpass":
        gen["lowpass"] = lowpass_d0(args, input_size)
    if method == "sadag-pass":
        gen["refine_parallel"] = math.ceil(args.num_images / gen["batch_size"])
    if (source := genie_source(args, bits, method)) is not None:
        gen["genie_set"] = str(run_dir(Path(args.work), args.model, source, BASE, seed) / "synthetic")
    calib = dict(b["calib"])
    variant = dict(CALIBRATION_VARIANTS.get(method, {}))
    if (ranks := variant.pop("wide_ranks", None)) is not None:
        calib["iters"], calib["batch_size"] = wide_split(calib["iters"], calib["batch_size"], ranks)
    calib.update(variant)
    extra: dict[str, Any] = {}
    budget_sections = {"gen": gen, "calib": calib}
    if kind == "real":  # real images: no generation setting is read, so none is given (sadag refuses them)
        extra = {"calib_data": str(args.real_data), "num_calib": args.num_images}
        del budget_sections["gen"]
    out = run_dir(Path(args.work), args.model, bits, method, seed)
    return base_config(args.model, out, method=kind, bits=bits, preset="paper", seed=seed, device=args.device,
                       eval_limit=args.eval_limit, **sections(budget_sections, kind), **extra)


def row_of(directory: Path, bits: str, method: str, seed: int) -> dict[str, Any]:
    """The protocol's row of a finished run, its budget read from the run's own resolved config.yaml."""
    report = json.loads((directory / "report.json").read_text())
    cfg = yaml.safe_load((directory / "config.yaml").read_text())
    env_file = directory / "environment.json"
    env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    return {"model": report["model"], "bits": bits, "method": method, "seed": seed, "top1": report["quant_top1"],
            "num_images": report["num_calib"], "eval_images": report.get("eval_images"),
            **calibration_of(directory), "fp_top1": report.get("fp_top1"),
            "gen": {k: cfg["gen"].get(k) for k in GEN_KEYS}, "seconds": report.get("seconds", {}),
            # the run whose Genie-D set this one started from (its directory's name), if any
            "genie_set_of": Path(cfg["gen"]["genie_set"]).parent.name if cfg["gen"].get("genie_set") else None,
            "device": report.get("device"), "deterministic": repeatable(report.get("device"), env),
            # by content: the images it calibrated on, and the saved Genie set it started from (None before these
            # were recorded)
            "calib_digest": report.get("calib_digest"), "genie_set_digest": report.get("genie_set_digest"),
            # where it ran, from its latest session (None fields for a run made before environment.json said)
            "machine": {k: env.get(k) for k in MACHINE_KEYS}}


def repeatable(device: str | None, env: dict[str, Any]) -> bool | None:
    """Whether the run repeats bit for bit (same machine and threads): always on a CPU, on CUDA only with
    deterministic algorithms on; None for a CUDA run made before environment.json recorded that."""
    if device == "cpu":
        return True
    return env.get("deterministic_algorithms")


def _worker_setup(threads: int, deterministic: bool) -> None:
    torch.set_num_threads(threads)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        # warn_only: a few CUDA backward kernels (adaptive average pooling) have no deterministic version
        torch.use_deterministic_algorithms(True, warn_only=True)


def one_run(args: argparse.Namespace, bits: str, method: str, seed: int, input_size: int) -> dict[str, Any]:
    _worker_setup(args.threads, args.deterministic)
    cfg = run_config(args, bits, method, seed, input_size)
    run_row(cfg)
    return row_of(Path(cfg.out), bits, method, seed)


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """Every (bits, method, seed): seed by seed, genie first, real last, so that paired differences exist as
    early as possible and the headroom runs (which pair with nothing but genie) fill the remaining time."""
    methods = sorted(args.methods, key=lambda m: (m != BASE, m == "real"))
    zero_shot = [(b, m, s) for s in args.seeds for m in methods if m != "real" for b in args.bits]
    return zero_shot + [(b, "real", s) for s in args.seeds for b in args.bits if "real" in methods]


def ready(job: tuple[str, str, int], done: set[tuple[str, str, int]], args: argparse.Namespace) -> bool:
    """Whether the job can start: its genie run's set is written (atomically, before that run calibrates)."""
    bits, method, seed = job
    if (source := genie_source(args, bits, method)) is None:
        return True
    genie = (source, BASE, seed)
    return genie in done or (run_dir(Path(args.work), args.model, *genie) / "synthetic" / "images.pt").is_file()


def run_all(args: argparse.Namespace, input_size: int) -> list[dict[str, Any]]:
    """The plan on --jobs processes; the first ready job in order takes each free process (a job waiting for a
    genie set is passed over until that set is written)."""
    todo, done, rows = plan(args), set(), []
    if args.jobs <= 1:
        for job in todo:
            if not ready(job, done, args):
                _missing_genie(job, args)
            rows.append(one_run(args, *job, input_size))
            done.add(job)
        return rows
    # spawn: no forked CUDA state; each process loads the model once per run (runs are minutes, that is cheap)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        running: dict[Any, tuple[str, str, int]] = {}
        while todo or running:
            while len(running) < args.jobs and (job := next((j for j in todo if ready(j, done, args)), None)):
                todo.remove(job)
                running[pool.submit(one_run, args, *job, input_size)] = job
            if not running:
                _missing_genie(todo[0], args)
            finished, _ = wait(running, timeout=15, return_when=FIRST_COMPLETED)
            for f in finished:
                done.add(running.pop(f))
                rows.append(f.result())
                print(json.dumps({k: rows[-1][k] for k in ("bits", "method", "seed", "top1")}), flush=True)
    return rows


def _missing_genie(job: tuple[str, str, int], args: argparse.Namespace) -> None:
    bits, method, seed = job
    source = genie_source(args, bits, method)
    raise SystemExit(f"{method} at {bits}, seed {seed} starts from the genie run at {source} of that seed: add "
                     f"genie{'' if source == bits else ' and ' + source} to --methods/--bits or run it first")


ROW_KEY = ("bits", "method", "seed")  # the fields that name a run of one model
RUN_NAME = re.compile(r"w(\d+)a(\d+)_(.+)_s(\d+)")


def row_key(r: dict[str, Any]) -> tuple:
    return tuple(r[k] for k in ROW_KEY)


def finished_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of every finished run of this model in --work, whatever --bits/--methods/--seeds say: the results file
    is rewritten from these, so a collect with fewer arguments than the runs had must not drop rows."""
    rows = []
    for directory in sorted((Path(args.work) / "protocol" / args.model).glob("w*_s*")):
        name = RUN_NAME.fullmatch(directory.name)
        if name and name[3] in METHODS and (directory / "report.json").is_file():
            rows.append(row_of(directory, f"{name[1]}/{name[2]}", name[3], int(name[4])))
    return rows


def check_one_budget(rows: list[dict[str, Any]]) -> None:
    """Rows pair by (bits, method, seed) alone, so one table (one results file) holds one budget: the same images,
    Genie-D steps and test images for every method; the same calibration (iterations and minibatch, genie-wide's
    counted back to one process's; engine and QDrop's draw but where a calibration variant changes them); and
    within each method, across bits and seeds, one engine, draw and generation settings, or rows of two settings
    would be paired as repeats of one method. Another budget goes to a file of its own (--tag)."""
    def fields(r: dict[str, Any]) -> dict[str, Any]:
        method, varied = r["method"], CALIBRATION_VARIANTS.get(r["method"], {})
        iters, batch = one_process_calibration(r)
        f = {"num_images": r["num_images"], "eval_images": r.get("eval_images"), "calib_iters": iters,
             "calib_batch_size": batch}
        for key in ("engine", "drop_draw"):  # what a variant changes is one within the variant
            f[f"{key} of {method}" if key in varied else key] = r.get(key)
        if method != "real":  # real runs generate nothing (since 2026-12-02 they record the preset's steps)
            f["gen.genie_iters"] = r["gen"].get("genie_iters")
            f[f"gen of {method}"] = gen_settings(r["gen"], METHODS[method][0] if method in METHODS else None)
        return f

    seen: dict[str, dict[Any, list[str]]] = {}
    for r in rows:
        for key, value in fields(r).items():
            seen.setdefault(key, {}).setdefault(value, []).append(f"{r['method']} {r['bits']} s{r['seed']}")
    mixed = {k: v for k, v in seen.items() if len(v) > 1}
    if mixed:
        shown = "; ".join(f"{k}: " + ", ".join(f"{v!r} ({len(runs)} runs, e.g. {runs[0]})" for v, runs in vals.items())
                          for k, vals in mixed.items())
        raise SystemExit(f"these runs and the results file's rows are of different budgets ({shown}): they would be "
                         "paired by seed across budgets. Collect each budget from its own --work into its own file "
                         "(--tag, e.g. --tag n1024)")


def one_process_calibration(r: dict[str, Any]) -> tuple[Any, Any]:
    """A row's (iterations, minibatch), a wide split's counted back to the one process that sees the same images
    per unit (wide_split's inverse): genie-wide is of the budget only if it is the wide split of the others'."""
    ranks = CALIBRATION_VARIANTS.get(r["method"], {}).get("wide_ranks", 1)
    iters, batch = r["calib_iters"], r.get("calib_batch_size")
    if batch is not None and ranks > 1:
        batch = batch // ranks if batch % ranks == 0 else batch / ranks  # a fraction: the split of no minibatch
    return iters * ranks, batch


def gen_settings(gen: dict[str, Any], kind: str | None = None) -> str:
    """A row's generation settings that its method ``kind`` reads, as one comparable value (the others are
    whatever the preset said, and since 2026-12-02 not given: they differ between rows and change nothing). A
    setting it does not hold (its run was made, or the row written, before the setting existed) is at its
    default, the value sadag resumes such a run at."""
    defaults, reads = result_defaults(), METHOD_GEN_READS.get(kind, GEN_KEYS)
    return json.dumps({k: defaults[f"gen.{k}"] if gen.get(k) is None else gen[k] for k in GEN_KEYS if k in reads},
                      sort_keys=True)


def set_verdicts(rows: list[dict[str, Any]]) -> tuple[dict[tuple, bool | None], dict[tuple, bool | None]]:
    """Whether each run that started from a genie run's set started from the images that genie row calibrated on
    (their digests; None when either is unknown, made before digests were recorded): first the runs that pair
    with the genie row of their bits, then the genie rows made with --genie-from, which pair with nothing."""
    calibrated = {row_key(r): r.get("calib_digest") for r in rows}
    pairs: dict[tuple, bool | None] = {}
    genie_from: dict[tuple, bool | None] = {}
    for r in rows:
        if not (source := RUN_NAME.fullmatch(r.get("genie_set_of") or "")):
            continue
        genie = calibrated.get((f"{source[1]}/{source[2]}", source[3], int(source[4])))
        mine = r.get("genie_set_digest")
        (genie_from if r["method"] == BASE else pairs)[row_key(r)] = (
            None if mine is None or genie is None else mine == genie)
    return pairs, genie_from


def check_pairs(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows that pair, and an account: a run that started from a genie run's set pairs with that genie row
    exactly only if it started from the images that row calibrated on (their digests). A genie run made again
    on another machine (other float rounding) breaks that; such a row is left out of the paired differences.
    Rows made before digests were recorded are kept, counted as unverified. A genie row made with --genie-from
    on other images than its source row's is only reported: the pairs of its bits verify against its own."""
    pairs, genie_from = set_verdicts(rows)
    broken = sorted(k for k, ok in pairs.items() if ok is False)
    for key in broken:
        print(f"not paired: {key} started from another set than its genie row calibrated on (left out)", flush=True)
    mismatch = sorted(k for k, ok in genie_from.items() if ok is False)
    for key in mismatch:
        print(f"note: {key} (--genie-from) calibrated on another set than its source genie row (kept: the pairs of "
              "its bits are checked against its own images)", flush=True)
    account = {"verified": sum(ok is True for ok in pairs.values()),
               "unverified": sum(ok is None for ok in pairs.values()), "broken": [list(k) for k in broken],
               "genie_from_mismatch": [list(k) for k in mismatch]}
    left_out = set(broken)
    return [r for r in rows if row_key(r) not in left_out], account


def runs_budget(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct budgets of the runs (read from their own config.yaml), each with its number of runs."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        b = {"num_images": r["num_images"], "calib_iters": r["calib_iters"], "calib_batch_size": r["calib_batch_size"],
             "drop_draw": r["drop_draw"], "engine": r["engine"], "gen": r["gen"]}
        seen.setdefault(json.dumps(b, sort_keys=True), {**b, "runs": 0})["runs"] += 1
    return list(seen.values())


# --- the gradient-alignment probe of every set, with each (bits, seed)'s SADAG warm-up model ------------

def probe_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from sadag.data import load_calibration_data
    from sadag.generation import load_synthetic_set
    from sadag_probe import last_layer_terms, mean_gradient, probe_set, warmup_model

    fp, spec = sadag.load_model(args.model, weights=base_config(args.model, Path(".")).weights)
    fp.eval()
    real = load_calibration_data(EVAL[args.model][0], spec, args.probe_real, seed=0)
    # the reference gradient is taken on test images: fine for a diagnostic, never for calibration
    rows = []
    for bits in args.bits:
        for seed in args.seeds:
            sadag_dir = run_dir(Path(args.work), args.model, bits, "sadag", seed)
            if not (sadag_dir / "warmup.safetensors").is_file():
                continue
            q = warmup_model(sadag_dir, fp)
            g_real = mean_gradient(*last_layer_terms(fp, q, real))
            genie_dir = run_dir(Path(args.work), args.model, bits, BASE, seed) / "synthetic"
            genie = load_synthetic_set(genie_dir)[0] if (genie_dir / "images.pt").is_file() else None
            if args.real_data:  # the real run's images (same sample as method real): what a set could reach
                train = load_calibration_data(args.real_data, spec, args.num_images, seed=seed)
                rows.append({"bits": bits, "seed": seed, "set": "real", **probe_set(fp, q, train, g_real)})
                print(json.dumps(rows[-1]), flush=True)
            for method in METHODS:
                if method in CALIBRATION_VARIANTS:  # its set is the genie run's; only the calibration differs
                    continue
                directory = run_dir(Path(args.work), args.model, bits, method, seed) / "synthetic"
                if (directory / "images.pt").is_file():
                    images = load_synthetic_set(directory)[0]
                    rows.append({"bits": bits, "seed": seed, "set": method,
                                 **probe_set(fp, q, images, g_real, genie if method != BASE else None)})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def collect(args: argparse.Namespace) -> Path:
    """Write the results file from the finished runs in --work and the file's own rows of runs not there (run
    directories do not outlive the machine that made them), with the paired summaries over them all."""
    name = f"protocol_{args.model}{'_' + args.tag if args.tag else ''}"
    path = RESULTS / f"{name}.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {"rows": [], "meta": {}}
    found = finished_rows(args)
    check_one_budget(recorded["rows"] + found)  # before a row of another budget replaces a recorded one
    rows = merge_rows(recorded["rows"], found, ROW_KEY)
    for r in rows:  # rows recorded before runs said whether they repeat: known for CPU runs only
        r.setdefault("deterministic", repeatable(r.get("device"), {}))
    paired, pairs = check_pairs(rows)
    print(tables(paired))
    bits = sorted({r["bits"] for r in rows}, key=lambda b: [-int(x) for x in b.split("/")])
    meta = {"budget": runs_budget(rows), "seeds": sorted({r["seed"] for r in rows}), "bits": bits,
            # read from the runs, not from this collect's flags: True only if every run repeats bit for bit
            "deterministic": all(r["deterministic"] is True for r in rows),
            "pairs": pairs, "paired": paired_cells(paired, bits)}
    # without --probe the recorded probe stays; with it, the probe of the sets in --work replaces theirs
    probe = merge_rows(recorded["meta"].get("probe", []), probe_rows(args) if args.probe else [],
                       ("bits", "seed", "set"))
    if probe:
        meta["probe"] = probe
    return write_results(name, rows, meta)


def quantized_bits(text: str) -> str:
    """W/A bits with both quantized: the run directories and the tables are named by both numbers."""
    if not re.fullmatch(r"[2-8]/[2-8]", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give weight/activation bits, each 2 to 8, e.g. 2/4")
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number (0 would make genie-lowpass genie)")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20_cifar10", choices=list(EVAL))
    p.add_argument("--bits", nargs="+", type=quantized_bits, default=["4/4", "3/3", "2/4", "2/2"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=128, help="Genie-D / SADAG batch (each has its own generator)")
    p.add_argument("--calib-iters", type=int, default=2000, help="reconstruction iterations per unit")
    p.add_argument("--genie-iters", type=int, default=1000)
    p.add_argument("--genie-from", metavar="BITS",
                   help="genie at other bits reuses the genie set of this bits' run of the same seed (Genie-D does "
                   "not depend on the bits)")
    p.add_argument("--refine-iters", type=int, default=200, help="SADAG stage C iterations per batch")
    p.add_argument("--warmup-iters", type=int, default=500, help="SADAG stage B iterations per unit")
    p.add_argument("--lowpass", type=positive_float, help="D0 of genie-lowpass (default 80 at 224 px, 20 below)")
    p.add_argument("--real-data", help="real training images for method real (default: CIFAR-10 train-5k for the "
                   "CIFAR models; none for ImageNet models, whose only real images here are the test set)")
    p.add_argument("--eval-limit", type=int, help="evaluate on at most this many test images per class (sadag's "
                   "--eval-limit); rows record the number evaluated, and one results file holds one number")
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", default="auto", choices=["auto", "eager", "fused", "compiled"],
                   help="reconstruction step (calib.engine); eager avoids per-process compile time on short runs")
    p.add_argument("--drop-draw", default="uniform", choices=["uniform", "bytes"],
                   help="QDrop's masks (calib.drop_draw): uniform, the draw of every published protocol row, so "
                        "that one table shares one random stream and its unfinished runs resume; bytes is faster")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (GPU); nn.AdaptiveAvgPool2d's CUDA backward has no "
                   "deterministic kernel and raises (the CIFAR ResNets pool with it)")
    p.add_argument("--work", default=str(WORK))
    p.add_argument("--collect", action="store_true", help="only tabulate the finished runs")
    p.add_argument("--probe", action="store_true", help="with --collect: the gradient-alignment probe of each set")
    p.add_argument("--probe-real", type=int, default=2000, help="real test images for the probe's reference")
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. smoke: protocol_<model>_smoke.json)")
    args = p.parse_args()
    if args.deterministic:  # cuBLAS needs this before CUDA starts, in every process (spawned ones inherit it)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.real_data is None and args.model.endswith("cifar10"):
        args.real_data = str(CIFAR_TRAIN)
    if "real" in args.methods and not (args.real_data and Path(args.real_data).is_dir()):
        raise SystemExit(f"method real needs a folder of real training images; {args.real_data} is not one "
                         "(pass --real-data DIR or leave real out of --methods)")
    _worker_setup(args.threads, args.deterministic)
    input_size = sadag.load_model(args.model, weights=base_config(args.model, Path(".")).weights)[1].input_size
    if not args.collect:
        try:
            run_all(args, input_size)
        except sadag.SadagError as exc:  # e.g. a run directory of this --work made with another budget
            raise SystemExit(f"{exc}\n(protocol.py: the runs of another budget belong in another --work)") from exc
        rows = finished_rows(args)
        check_one_budget(rows)
        print(tables(check_pairs(rows)[0]))
        print("(the results file is written by --collect, over the seeds and methods it is given)")
        return
    path = collect(args)
    print(f"machine: {machine()}; results in {path}")


if __name__ == "__main__":
    main()
